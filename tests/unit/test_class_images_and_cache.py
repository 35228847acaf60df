from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from big.training.class_images import ensure_class_images, is_blank
from big.generation.sampling import PipelineCache
from big.weights.pipelines import base_key
from big.storage.workspace import Workspace


class FakePipe:
    """Stands in for the base pipeline: black for chosen seeds, a coloured noise image otherwise."""

    device = "cpu"

    def __init__(self, black_seeds=()):
        self.black_seeds = set(black_seeds)
        self.calls = []

    def __call__(self, prompts, *, generator, height, width, **kw):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append(seeds)
        imgs = []
        for s in seeds:
            if s in self.black_seeds:
                imgs.append(Image.new("RGB", (width, height)))
            else:
                rng = np.random.default_rng(s)
                imgs.append(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))
        return SimpleNamespace(images=imgs)


def test_only_missing_class_images_are_generated_and_blank_ones_redrawn(tmp_path):
    ws = Workspace(str(tmp_path))
    pipe = FakePipe(black_seeds={1, 3})
    imgs, made = ensure_class_images(ws, "base", lambda: pipe, "dog", 4, size=32, steps=2, guidance_scale=1.0)
    assert made == 4 and not any(is_blank(i) for i in imgs)
    assert pipe.calls[0] == [0, 1, 2, 3] and sorted(pipe.calls[1]) == [1_000_003 + 1, 1_000_003 + 3]

    built = []
    imgs2, made2 = ensure_class_images(ws, "base", lambda: built.append(1) or pipe, "dog", 4, size=32, steps=2,
                                       guidance_scale=1.0)
    assert made2 == 0 and built == [] and [i.tobytes() for i in imgs2] == [i.tobytes() for i in imgs]
    imgs3, made3 = ensure_class_images(ws, "base", lambda: pipe, "dog", 6, size=32, steps=2, guidance_scale=1.0)
    assert made3 == 2 and pipe.calls[-1] == [4, 5]
    # Another base model or category has its own cache.
    _, made4 = ensure_class_images(ws, "other-base", lambda: pipe, "dog", 1, size=32, steps=2, guidance_scale=1.0)
    assert made4 == 1


def test_a_model_that_only_makes_blank_images_is_an_error(tmp_path):
    class Black(FakePipe):
        def __call__(self, prompts, *, generator, height, width, **kw):
            return SimpleNamespace(images=[Image.new("RGB", (width, height)) for _ in generator])

    with pytest.raises(RuntimeError, match="blank"):
        ensure_class_images(Workspace(str(tmp_path)), "b", Black, "dog", 2, size=32, steps=1, guidance_scale=1.0)


def test_class_images_are_made_in_halves_when_a_batch_does_not_fit(tmp_path):
    class SmallGpu(FakePipe):
        def __call__(self, prompts, *, generator, **kw):
            if len(generator) > 2:
                self.calls.append(("oom", len(generator)))
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().__call__(prompts, generator=generator, **kw)

    small, roomy = SmallGpu(), FakePipe()
    imgs, made = ensure_class_images(Workspace(str(tmp_path / "a")), "base", lambda: small, "dog", 5, size=32,
                                     steps=2, guidance_scale=1.0)
    ref, _ = ensure_class_images(Workspace(str(tmp_path / "b")), "base", lambda: roomy, "dog", 5, size=32, steps=2,
                                 guidance_scale=1.0)
    assert made == 5 and [i.tobytes() for i in imgs] == [i.tobytes() for i in ref]
    assert small.calls == [("oom", 5), [0, 1], ("oom", 3), [2], [3, 4]]


def test_pipeline_cache_is_lru_bounded_by_bytes_and_loads_once():
    cache = PipelineCache(max_bytes=100)
    loads = []

    def loader(name, size):
        return lambda: (loads.append(name) or name, size)

    assert cache.get("a", loader("a", 60)) == "a"
    assert cache.get("a", loader("a", 60)) == "a" and loads == ["a"]
    cache.get("b", loader("b", 30))
    cache.get("a", loader("a", 60))  # a is now most recent
    cache.get("c", loader("c", 30))  # 120 bytes: evict the least recent (b)
    assert cache.get("a", loader("a", 60)) == "a" and loads == ["a", "b", "c"]
    cache.get("b", loader("b", 30))
    assert loads == ["a", "b", "c", "b"]
    cache.drop(lambda k: k == "a")
    cache.get("a", loader("a", 60))
    assert loads[-1] == "a"


def _model_folder(root, weights: dict[str, bytes]):
    for sub, data in weights.items():
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text('{"_class_name": "X"}')
        (root / sub / "model.safetensors").write_bytes(data)
    return str(root)


@pytest.mark.parametrize("size", [1000, 3 << 20])  # read whole, and sampled in chunks
def test_class_image_cache_key_tells_same_shaped_fine_tunes_apart(tmp_path, size):
    # Two fine-tunes of one architecture share configs and file sizes; a cache keyed by those alone
    # would hand one model's class images to the other.
    rng = np.random.default_rng(0)
    unet, text = rng.bytes(size), rng.bytes(size)
    if size < (1 << 20):
        retrained = bytearray(unet)
        retrained[size // 2] ^= 0xFF  # a small file is hashed whole: one byte is enough
    else:
        retrained = rng.bytes(size)  # a large one is sampled: retrained weights differ everywhere
    base = _model_folder(tmp_path / "base", {"unet": unet, "text_encoder": text})
    copy = _model_folder(tmp_path / "copy", {"unet": unet, "text_encoder": text})
    tuned = _model_folder(tmp_path / "tuned", {"unet": bytes(retrained), "text_encoder": text})
    other_text = _model_folder(tmp_path / "other_text", {"unet": unet, "text_encoder": rng.bytes(size)})
    keys = {name: base_key(p) for name, p in
            [("base", base), ("copy", copy), ("tuned", tuned), ("other_text", other_text)]}
    assert keys["base"] == keys["copy"]  # a copied folder keeps its cache
    assert len({keys["base"], keys["tuned"], keys["other_text"]}) == 3, keys
    assert all(k.startswith("local-") for k in keys.values())
