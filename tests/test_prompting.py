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


def test_a_plain_prompt_encodes_exactly_as_the_pipeline_does(pipe):
    ours, neg = prompting.encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a sks red star"], [""], "cpu")
    theirs, their_neg = pipe.encode_prompt("a sks red star", "cpu", 1, True, negative_prompt="")
    assert torch.equal(ours, theirs) and torch.equal(neg, their_neg)


def test_original_emphasis_scales_only_the_weighted_tokens_then_restores_the_mean(pipe):
    tok = pipe.tokenizer
    plain, _ = prompting.encode_prompts(tok, pipe.text_encoder, ["a red star"], [""], "cpu")
    weighted, _ = prompting.encode_prompts(tok, pipe.text_encoder, ["a (red:1.5) star"], [""], "cpu",
                                           emphasis="original")
    red = 1 + len(tok("a", add_special_tokens=False).input_ids)  # after BOS and "a"
    w = torch.ones(1, plain.shape[1])
    w[0, red] = 1.5
    assert torch.allclose(weighted, prompting.apply_weights(plain, w), atol=1e-6)
    assert torch.allclose(weighted.abs().mean(), plain.abs().mean(), atol=1e-5)
    ratio = (weighted[0].abs().sum(dim=1) / plain[0].abs().sum(dim=1))  # per token
    assert ratio[red] / ratio[0] == pytest.approx(1.5, rel=1e-4)
    assert torch.allclose(ratio[torch.arange(len(ratio)) != red], ratio[0], rtol=1e-4)


def _encode(pipe, prompt, emphasis):
    return prompting.encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt], [""], "cpu", emphasis=emphasis)[0]


def test_context_emphasis_at_weight_zero_is_the_prompt_with_the_word_hidden_from_every_other_token(pipe):
    tok = pipe.tokenizer
    red = 1 + len(tok("a", add_special_tokens=False).input_ids)
    plain, zeroed = _encode(pipe, "a red star", "context"), _encode(pipe, "a (red:0) star", "context")
    ids = tok("a red star", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    mask[0, red] = 0
    hidden = pipe.text_encoder(ids, attention_mask=mask)[0]
    assert torch.all(zeroed[0, red] == 0)
    later = torch.arange(zeroed.shape[1]) > red
    # Every later state is the hidden-word encoding, up to the one rescale factor of the sequence.
    factor = zeroed[0, later].abs().sum() / hidden[0, later].abs().sum()
    assert torch.allclose(zeroed[0, later], hidden[0, later] * factor, atol=1e-5)
    assert not torch.allclose(zeroed[0, later], plain[0, later] * factor, atol=1e-2)  # the word was there before
    assert torch.allclose(zeroed[0, :red], plain[0, :red] * factor, atol=1e-5)  # earlier tokens never saw it


def test_context_emphasis_extrapolates_what_the_word_adds_and_keeps_the_magnitude(pipe):
    plain, hidden = _encode(pipe, "a red star", "context"), _encode(pipe, "a (red:0) star", "context")
    double = _encode(pipe, "a (red:2) star", "context")
    assert double.abs().mean() == pytest.approx(float(plain.abs().mean()), rel=1e-4)
    # Away from the word, weight 2 moves the states away from the hidden-word encoding, past the plain one.
    eos = plain.shape[1] - 1
    to_plain = torch.nn.functional.cosine_similarity(double[0, eos] - plain[0, eos], plain[0, eos] - hidden[0, eos], dim=0)
    assert to_plain > 0.9


def test_weight_one_and_mode_none_leave_the_prompt_plain(pipe):
    plain = _encode(pipe, "a red star", "context")
    assert torch.equal(_encode(pipe, "a (red:1) star", "context"), plain)
    assert torch.equal(_encode(pipe, "a ((red:3)) [star]", "none"), plain)
    with pytest.raises(ValueError, match="emphasis must be one of"):
        _encode(pipe, "a red star", "loud")


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


def test_long_prompts_are_chunked_not_truncated_and_negatives_padded_to_match(pipe):
    tok = pipe.tokenizer
    window = tok.model_max_length
    long_prompt = ", ".join(["a red star on a black background"] * 6)
    n_tokens = len(tok(long_prompt, add_special_tokens=False).input_ids)
    assert n_tokens > window
    emb, neg = prompting.encode_prompts(tok, pipe.text_encoder, [long_prompt, "a star"], ["", "blue"], "cpu")
    chunks = -(-n_tokens // (window - 2))
    assert emb.shape[:2] == neg.shape[:2] == (2, chunks * window)
    # The tail of the long prompt is in the last chunk, not dropped: it differs from an empty chunk.
    empty_chunk = neg[0, -window:]
    assert not torch.allclose(emb[0, -window:], empty_chunk)
    # The short prompt's padding chunks are empty-prompt chunks.
    assert torch.allclose(emb[1, -window:], empty_chunk)
