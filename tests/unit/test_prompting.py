"""Prompt emphasis and long prompts (executor/prompting.py)."""
import pytest
import torch

from big.generation import prompting
from big.weights.pipelines import load_base_pipeline

P = prompting.parse_emphasis


def approx(frags):
    return [(t, pytest.approx(w)) for t, w in frags]


@pytest.mark.parametrize("prompt,expected", [
    ("a red star", [("a red star", 1.0)]),
    ("a (red) star", [("a ", 1.0), ("red", 1.1), (" star", 1.0)]),
    ("a ((red)) star", [("a ", 1.0), ("red", 1.21), (" star", 1.0)]),
    ("a [red] star", [("a ", 1.0), ("red", 1 / 1.1), (" star", 1.0)]),
    ("a (red:1.5) star", [("a ", 1.0), ("red", 1.5), (" star", 1.0)]),
    ("a (red (star):0.5)", [("a ", 1.0), ("red ", 0.5), ("star", 0.55)]),
    ("a ((red) star:2)", [("a ", 1.0), ("red", 2.2), (" star", 2.0)]),
    (r"a \(red\) star", [("a (red) star", 1.0)]),
    (r"a \\ star", [("a \\ star", 1.0)]),
    ("a (red star", [("a ", 1.0), ("red star", 1.1)]),
    ("a red) star]", [("a red) star]", 1.0)]),
    ("time: noon", [("time: noon", 1.0)]),
    ("", [("", 1.0)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("[[a]]", [("a", 1 / 1.21)]),
])
def test_emphasis_syntax(prompt, expected):
    assert approx(P(prompt)) == approx(expected)


@pytest.mark.parametrize("prompt,expected", [
    ("a red star", [("a red star", 1.0)]),
    ("a red star :2", [("a red star :2", 1.0)]),  # a weight means something only beside AND
    ("a red star AND a blue circle", [("a red star", 1.0), ("a blue circle", 1.0)]),
    ("a qzq painting of a sks dog AND a sks dog :2", [("a qzq painting of a sks dog", 1.0), ("a sks dog", 2.0)]),
    ("a cat:0.5 AND a dog : -1.5", [("a cat", 0.5), ("a dog", -1.5)]),
    ("a (red:1.5) star AND a circle :.5", [("a (red:1.5) star", 1.0), ("a circle", 0.5)]),
    ("sand and ANDROID AND x", [("sand and ANDROID", 1.0), ("x", 1.0)]),
    ("a star AND", [("a star", 1.0), ("", 1.0)]),
])
def test_composable_prompt_syntax(prompt, expected):
    assert prompting.composable_parts(prompt) == expected


@pytest.fixture(scope="module")
def pipe():
    return load_base_pipeline("embedded", torch.device("cpu"))


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_weights_keep_the_mean_when_it_is_meaningful_else_the_magnitude(offset):
    g = torch.Generator().manual_seed(0)
    states = torch.randn(2, 6, 8, generator=g) + offset
    w = torch.ones(2, 6)
    w[0, 2] = 1.5
    out = prompting.apply_weights(states, w)
    assert torch.equal(out[1], states[1])  # an unweighted sequence is untouched
    if offset:
        assert out[0].mean() == pytest.approx(float(states[0].mean()), rel=1e-5)
    else:
        assert out[0].abs().mean() == pytest.approx(float(states[0].abs().mean()), rel=1e-5)
    factor = out[0, 0, 0] / states[0, 0, 0]
    assert torch.allclose(out[0, 2], states[0, 2] * 1.5 * factor, atol=1e-5)


