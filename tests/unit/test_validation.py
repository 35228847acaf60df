import io

import numpy as np
import pytest
from docarray.documents import ImageDoc
from PIL import Image

from big.errors import BadRequest
from big.config import Limits
from big.parsing import flag, parse_finetune, parse_generate, prompt_of
from executor.decode import decode_instance_images

DEF_FT = dict(learning_rate=1e-4, max_train_steps=100, num_class_images=10)
DEF_GEN = dict(num_inference_steps=20, guidance_scale=4.0, height=32, width=32)
L = Limits()


def png(size=(64, 64), colour=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_finetune_defaults_and_float_integers():
    r = parse_finetune({"category": "Dog", "max_train_steps": 300.0}, DEF_FT, L)
    assert (r.category, r.max_train_steps, r.target, r.wait) == ("dog", 300, "private", True)
    assert (r.lr_scheduler, r.lr_warmup_steps, r.snr_gamma) == ("constant", 0, None)


def test_schedule_defaults_come_from_the_method_and_fit_short_runs():
    defaults = {**DEF_FT, "per_method": {"lora": {"lr_scheduler": "cosine", "lr_warmup_steps": 40, "snr_gamma": 5}}}
    r = parse_finetune({"category": "dog", "max_train_steps": 20}, defaults, L)
    assert (r.lr_scheduler, r.lr_warmup_steps, r.snr_gamma) == ("cosine", 20, 5)  # warmup capped at the steps
    r = parse_finetune({"category": "dog", "method": "dreambooth"}, defaults, L)
    assert (r.lr_scheduler, r.lr_warmup_steps, r.snr_gamma) == ("constant", 0, None)


def test_metamodel_adapters_default_to_rank_4_over_the_methods_own_defaults():
    defaults = {**DEF_FT, "per_method": {"lora": {"lora_rank": 1}}}
    assert parse_finetune({"category": "dog"}, defaults, L).lora_rank == 1
    meta = parse_finetune({"category": "dog", "target_model": "meta"}, defaults, L)
    assert (meta.method, meta.metamodel_strategy, meta.lora_rank, meta.lora_alpha) == ("lora", "adapters", 4, 4.0)
    assert parse_finetune({"category": "dog", "target_model": "meta", "lora_rank": 2}, defaults, L).lora_rank == 2
    seed = parse_finetune({"category": "dog", "target_model": "private_meta", "metamodel_strategy": "seed_split"},
                          defaults, L)
    assert seed.method == "dreambooth"


def test_a_models_per_strategy_defaults_apply_to_that_metamodel_strategy_only():
    defaults = {**DEF_FT, "max_train_steps": 700, "per_strategy": {"adapters": {"max_train_steps": 500}}}
    assert parse_finetune({"category": "dog", "target_model": "meta"}, defaults, L).max_train_steps == 500
    assert parse_finetune({"category": "dog"}, defaults, L).max_train_steps == 700  # private
    naive = {"category": "dog", "target_model": "meta", "metamodel_strategy": "naive"}
    assert parse_finetune(naive, defaults, L).max_train_steps == 700
    asked = {"category": "dog", "target_model": "meta", "max_train_steps": 90}
    assert parse_finetune(asked, defaults, L).max_train_steps == 90


FINETUNE_KEYS = ("learning_rate", "max_train_steps", "num_class_images", "seed", "train_text_encoder",
                 "prior_loss_weight", "train_batch_size", "wait", "metamodel_strategy", "anchor_weight",
                 "train_identifier_embedding", "embedding_learning_rate", "method", "lora_rank", "lora_alpha",
                 "lora_text_encoder", "lora_targets", "num_vectors", "crop", "flip", "hue_copies", "split_oversized",
                 "lr_scheduler", "lr_warmup_steps", "snr_gamma", "target_model")
GENERATE_KEYS = ("target_model", "num_images", "num_inference_steps", "guidance_scale", "seed", "height", "width",
                 "scheduler", "model_version", "emphasis")


def test_flags_read_what_a_command_line_sends():
    assert [flag({"x": v}, "x", True) for v in ("false", "0", "no", 0, False)] == [False] * 5
    assert [flag({"x": v}, "x", False) for v in ("true", "1", "yes", 1, True)] == [True] * 5
    assert flag({"x": None}, "x", True) is True and flag({}, "x", False) is False
    with pytest.raises(BadRequest, match="true or false"):
        flag({"x": "maybe"}, "x", False)


@pytest.mark.parametrize("target", ["private", "meta"])
def test_a_null_parameter_means_its_default(target):
    # JSON clients send null for "not set"; it must never reach training as None (seed None crashed a job).
    base = {"category": "dog", "target_model": target}
    nulls = {k: None for k in FINETUNE_KEYS if k != "target_model"}
    assert parse_finetune({**base, **nulls}, DEF_FT, L) == parse_finetune(base, DEF_FT, L)
    nulls = {k: None for k in GENERATE_KEYS}
    assert parse_generate(nulls, DEF_GEN, L) == parse_generate({}, DEF_GEN, L)


@pytest.mark.parametrize("params,match", [
    ({}, "category is required"),
    ({"category": "../../etc"}, "category must be"),
    ({"category": "dog", "target_model": "everyone"}, "target_model"),
    ({"category": "dog", "max_train_steps": 0}, "max_train_steps"),
    ({"category": "dog", "max_train_steps": 1e9}, "max_train_steps"),
    ({"category": "dog", "max_train_steps": 10.5}, "integer"),
    ({"category": "dog", "learning_rate": 5.0}, "learning_rate"),
    ({"category": "dog", "learning_rate": float("nan")}, "finite"),
    ({"category": "dog", "learning_rate": "fast"}, "number"),
    ({"category": "dog", "wait": "maybe"}, "true or false"),
    ({"category": "dog", "lr_scheduler": "exponential"}, "lr_scheduler"),
    ({"category": "dog", "max_train_steps": 50, "lr_warmup_steps": 51}, "lr_warmup_steps"),
    ({"category": "dog", "snr_gamma": 0}, "snr_gamma"),
    ({"category": "painting", "hue_copies": 8}, "hue_copies"),
    ({"category": "painting", "hue_copies": 1.5}, "integer"),
    ({"category": "dog", "max_train_steps": True}, "max_train_steps must be a number, got True"),
])
def test_finetune_rejects(params, match):
    with pytest.raises(BadRequest, match=match):
        parse_finetune(params, DEF_FT, L)


@pytest.mark.parametrize("params,match", [
    ({"target_model": "nope"}, "target_model"),
    ({"num_images": 1000}, "num_images"),
    ({"height": 33}, "multiples of 8"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"identifier": "../x"}, "identifier"),
    ({"num_images": True}, "num_images must be a number"),
    ({"negative_prompt": "blurry, " * 200}, "negative_prompt longer than 1000 characters"),
])
def test_generate_rejects(params, match):
    with pytest.raises(BadRequest, match=match):
        parse_generate(params, DEF_GEN, L)


@pytest.mark.parametrize("prompt,match", [
    ("a star AND", "AND part is empty"),
    ("a star AND a circle :11", "within"),
    (" AND ".join(["a star"] * 9), "at most 8 AND parts"),
])
def test_composable_prompts_are_checked(prompt, match):
    with pytest.raises(BadRequest, match=match):
        prompt_of(prompt, L)
    assert prompt_of("a star AND a circle :-10", L) == "a star AND a circle :-10"


def test_images_decode_from_bytes_and_tensors():
    docs = [ImageDoc(bytes_=png()), ImageDoc(tensor=np.zeros((48, 48, 3), dtype=np.uint8))]
    imgs = decode_instance_images(docs, L)
    assert [im.size for im in imgs] == [(64, 64), (48, 48)]


def test_image_errors_are_clear():
    with pytest.raises(BadRequest, match="no instance images"):
        decode_instance_images([], L)
    with pytest.raises(BadRequest, match="not a readable image"):
        decode_instance_images([ImageDoc(bytes_=b"definitely not a png")], L)
    with pytest.raises(BadRequest, match="minimum side"):
        decode_instance_images([ImageDoc(bytes_=png((16, 16)))], L)
    with pytest.raises(BadRequest, match="too many"):
        decode_instance_images([ImageDoc(bytes_=png())] * (L.max_images + 1), L)
    with pytest.raises(BadRequest, match="remote URLs are not fetched"):
        decode_instance_images([ImageDoc(url="http://example.com/dog.png")], L)
    truncated = png()[:40]
    with pytest.raises(BadRequest, match="not a readable image"):
        decode_instance_images([ImageDoc(bytes_=truncated)], L)
