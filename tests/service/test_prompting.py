"""Prompt emphasis and long prompts (executor/prompting.py)."""
import pytest
import torch

from big.generation import prompting
from big.weights.pipelines import load_base_pipeline


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
