"""The version folder's one writer and one reader: every method's version written and read back the same."""
import json
import os
import types

import pytest
import torch
from safetensors.torch import load_file

from big.storage.versions import (FORMAT_VERSION, META_FILE, EmbeddingWeights, LoraWeights, VersionMeta,
                                  read_lora_bytes, read_version, write_version)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=32)


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                        num_hidden_layers=1, max_position_embeddings=77))


def meta(method, **kw):
    return VersionMeta(model_key_kind="private", base="local-0123", version=1, identifier="qzq", category="dog",
                       method=method, **kw)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_dreambooth_version_round_trip(tmp_path):
    unet, text = tiny_unet(), tiny_text_encoder()
    written = meta("dreambooth", prior_plan=[{"kind": "class", "count": 2}], n_training_images=3, final_loss=0.5)
    write_version(str(tmp_path), written, unet=unet, text_encoder=text)
    version = read_version(str(tmp_path))
    assert version.meta == written
    like = types.SimpleNamespace(unet=unet, device=torch.device("cpu"))
    unet2, text2 = version.modules(like)
    assert same_state(unet, unet2) and same_state(text, text2)
    assert not any(p.requires_grad for p in unet2.parameters())
    assert {f.split("/")[0] for f in version.files()} == {"unet", "text_encoder"}
    assert META_FILE not in version.files() and version.bytes() > 0
    assert version.embedding() is None


def test_dreambooth_version_without_text_encoder(tmp_path):
    write_version(str(tmp_path), meta("dreambooth"), unet=tiny_unet())
    version = read_version(str(tmp_path))
    assert version.modules(types.SimpleNamespace(unet=tiny_unet(), device=torch.device("cpu")))[1] is None
    assert {f.split("/")[0] for f in version.files()} == {"unet"}


def lora_state():
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    torch.manual_seed(2)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    return get_peft_model_state_dict(unet), {"unet": unet.peft_config["default"].to_dict()}


def test_lora_version_round_trip(tmp_path):
    state, config = lora_state()
    vectors = torch.randn(1, 16)
    written = meta("lora", lora_rank=2, lora_alpha=2.0, lora_targets="attention", num_vectors=1, overwrite=False)
    write_version(str(tmp_path), written, lora=LoraWeights(state, None, config),
                  embedding=EmbeddingWeights("qzq", vectors, 42, 10, a1111=False))
    version = read_version(str(tmp_path))
    assert version.meta == written
    stored = load_file(version.lora_file)
    assert {k.removeprefix("unet.") for k in stored} == set(state)
    assert all(torch.equal(stored[f"unet.{k}"], v) for k, v in state.items())
    assert torch.equal(version.embedding(), vectors)
    assert version.files() == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]


def test_imported_lora_is_kept_as_it_came(tmp_path):
    from safetensors.torch import save

    state, _ = lora_state()
    data = save({f"unet.{k}": v for k, v in state.items()})
    assert read_lora_bytes(data) is not None and read_lora_bytes(b"not safetensors") is None
    write_version(str(tmp_path), meta("lora", imported=["x.safetensors"], num_vectors=0),
                  lora=LoraWeights(file_bytes=data))
    version = read_version(str(tmp_path))
    assert open(version.lora_file, "rb").read() == data
    assert version.meta.imported == ["x.safetensors"] and version.meta.num_vectors == 0


def test_textual_inversion_version_round_trip(tmp_path):
    vectors = torch.randn(3, 16)
    written = meta("textual_inversion", num_vectors=3, overwrite=False)
    write_version(str(tmp_path), written, embedding=EmbeddingWeights("qzq", vectors, 42, 10, a1111=True))
    version = read_version(str(tmp_path))
    assert version.meta == written
    assert torch.equal(version.embedding(), vectors)
    assert version.files() == ["learned_embeds.safetensors", "qzq.pt"]


def test_meta_schema_is_versioned_and_reads_folders_written_before_it(tmp_path):
    written = meta("lora", trunk_version=0, adapters=[{"version": 1, "concept_id": "c", "identifier": "qzq"}],
                   metamodel_strategy="adapters")
    assert written.to_dict()["format"] == FORMAT_VERSION
    assert "prior_plan" not in written.to_dict()  # fields a method does not set stay out of the file
    assert VersionMeta.from_dict(json.loads(json.dumps(written.to_dict()))) == written
    # A folder from before the schema: no `format`, no `method` (DreamBooth then), an unknown key.
    os.makedirs(tmp_path / "old")
    with open(tmp_path / "old" / META_FILE, "w") as f:
        json.dump({"model_key_kind": "meta", "base": "b", "version": 3, "identifier": "x", "category": "dog",
                   "someday": 1}, f)
    old = read_version(str(tmp_path / "old")).meta
    assert (old.method, old.format, old.version) == ("dreambooth", FORMAT_VERSION, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_lora_with_non_finite_weights_is_refused(bad):
    from safetensors.torch import save

    from big.errors import BadRequest

    with pytest.raises(BadRequest):
        read_lora_bytes(save({"unet.a.lora_A.weight": torch.tensor([[bad]])}))
