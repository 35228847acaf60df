"""Private concepts in megabytes: LoRA and textual inversion, hot-swapped on the loaded base, exported in the
formats other tools read, imported back; and training images prepared as people prepare them."""
import logging
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import instance_images
from big.storage.versions import read_version
from big.generation import prompting
from big.weights import embeddings
from big.errors import BadRequest, Conflict, NotFound

FAST = {"category": "shape", "max_train_steps": 6, "num_class_images": 4}


def _pixels(imgs):
    return np.stack([np.asarray(g.image, dtype=np.int16) for g in imgs])


class _DiffusersWarnings(logging.Handler):
    """Collects what diffusers' own logger warns inside a `with` block (it does not propagate to pytest's)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("diffusers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("diffusers").removeHandler(self)


def _version_dir(service, user, identifier):
    c = service.registry.find_concept(owner=user, target="private", identifier=identifier)
    return service.registry.version_path(c["model_key"], c["version"])


# ---------------------------------------------------------------------------------------------- embeddings


def test_a_word_expands_to_its_vectors_and_each_position_gets_its_own(service):
    pipe = service.base_pipe
    tok, te = pipe.tokenizer, pipe.text_encoder
    tid = tok("sks", add_special_tokens=False).input_ids[0]
    own = te.get_input_embeddings().weight[tid].detach().unsqueeze(0)
    plain = prompting.encode_prompts(tok, te, ["a sks shape"], [""], service.device)[0]
    same = prompting.encode_prompts(tok, te, ["a sks shape"], [""], service.device,
                                    embeddings={tid: embeddings.ConceptEmbedding("sks", tid, own)})[0]
    assert torch.allclose(plain, same, atol=1e-6)  # the word's own vector: nothing changes
    three = torch.randn(3, own.shape[1])
    ids = torch.tensor([[1, tid, tid, tid, 5, tid, tid]])
    mask, index = embeddings.positions(ids, {tid: embeddings.ConceptEmbedding("sks", tid, three)})
    assert mask.tolist() == [[False, True, True, True, False, True, True]]
    assert index[0, 1:4].tolist() == [0, 1, 2] and index[0, 5:7].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- LoRA concepts
def test_a_private_concept_is_a_lora_by_default_and_weighs_kilobytes(service):
    r = service.finetune("alice", instance_images(4), FAST)
    assert r["method"] == "lora"
    folder = _version_dir(service, "alice", r["identifier"])
    assert sorted(os.listdir(folder)) == ["big_version.json", "learned_embeds.safetensors",
                                          "pytorch_lora_weights.safetensors"]
    unet_bytes = sum(p.numel() * 4 for p in service.base_pipe.unet.parameters())  # as trained and saved: fp32
    assert read_version(folder).bytes() <= 0.03 * unet_bytes  # the embedded model's LoRA: rank 2 on every layer
    # Every adapter in the file is loaded back (attention and convolutions alike), and a UNet-only file
    # loads without diffusers' "No LoRA keys associated to CLIPTextModel" warning.
    with _DiffusersWarnings() as diffusers_warnings:
        service.loras.load("probe", read_version(folder).lora_file)
    assert not [m for m in diffusers_warnings.messages if "No LoRA keys" in m], diffusers_warnings.messages
    from safetensors.torch import load_file
    saved = {k for k in load_file(os.path.join(folder, "pytorch_lora_weights.safetensors")) if "lora_A" in k}
    loaded = [n for n, _ in service.loras.pipe.unet.named_parameters() if "lora_A.probe" in n]
    assert len(loaded) == len(saved) > 0 and any("attn2.to_k" in n for n in loaded)
    service.loras.drop("probe")
    # The served base carries no adapter: training copies it, and pretrained images stay the base's.
    assert not getattr(service.base_pipe.unet, "peft_config", None)
    imgs = service.generate("alice", [f"a {r['identifier']} shape"], {"target_model": "private", "seed": 3})
    base = service.generate("alice", [f"a {r['identifier']} shape"], {"seed": 3})
    assert imgs[0].parameters["model"] == f"private:{r['identifier']}"
    assert not np.array_equal(_pixels(imgs), _pixels(base))


def test_two_users_loras_switch_without_reloading_and_stay_private(service):
    a = service.finetune("alice", instance_images(4), FAST)
    b = service.finetune("bob", instance_images(4, shape="star", colour="blue", mark="ring"), FAST)
    pa, pb = f"a {a['identifier']} shape", f"a {b['identifier']} shape"
    params = {"target_model": "private", "seed": 5, "num_images": 2}
    first = service.generate("alice", [pa], params)
    with warnings.catch_warnings(record=True) as caught:
        # "always": neither pytest.ini's blanket UserWarning filter nor an earlier warning from the same line
        # hides what this checks, peft's multiple-adapters warning when bob's adapter joins alice's.
        warnings.simplefilter("always")
        service.generate("bob", [pb], params)
    assert not [w for w in caught if "peft_config" in str(w.message)]
    again = service.generate("alice", [pa], params)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert len(service.loras.loaded()) == 2  # both stay loaded; a switch is set_adapters only
    with pytest.raises(NotFound):  # carol has no concepts: naming alice's word finds nothing of hers
        service.generate("carol", [pa], {"target_model": "private", "identifier": a["identifier"]})
    with pytest.raises(BadRequest, match="learns by method 'dreambooth'"):  # a metamodel learns its strategy's way
        service.finetune("alice", instance_images(2),
                         {**FAST, "target_model": "meta", "method": "lora", "metamodel_strategy": "naive"})


def test_a_lora_export_loads_in_plain_diffusers_and_makes_the_same_image(service, tmp_path):
    from diffusers import StableDiffusionPipeline

    from big.weights.pipelines import resolve_base

    r = service.finetune("alice", instance_images(4), FAST)
    files = dict(service.export("alice", r["identifier"]))
    assert set(files) == {"pytorch_lora_weights.safetensors", "learned_embeds.safetensors"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    ours = service.generate("alice", [f"a {r['identifier']} shape"], {
        "target_model": "private", "seed": 9, "num_inference_steps": 6})
    plain = StableDiffusionPipeline.from_pretrained(resolve_base("embedded"), safety_checker=None,
                                                    requires_safety_checker=False,
                                                    dtype=service.base_pipe.unet.dtype).to(service.device)
    plain.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    # The identifier is already a word of the vocabulary, so plain diffusers loads its tuned vector as a new token.
    plain.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="<alice-concept>")
    theirs = plain("a <alice-concept> shape", num_inference_steps=6, guidance_scale=service.generate_defaults[
        "guidance_scale"], generator=torch.Generator().manual_seed(9), height=32, width=32).images[0]
    diff = np.abs(np.asarray(theirs, dtype=np.int16) - _pixels(ours)[0])
    assert diff.mean() < 1.0, diff.mean()


def test_export_then_import_round_trips_to_another_user(service):
    r = service.finetune("alice", instance_images(4), FAST)
    files = service.export("alice", r["identifier"], "diffusers")
    got = service.import_concept("bob", files, {"category": "shape"})
    assert got["method"] == "lora" and got["identifier"]
    seed = {"target_model": "private", "seed": 4, "num_inference_steps": 6}
    a = service.generate("alice", [f"a {r['identifier']} shape"], seed)
    b = service.generate("bob", [f"a {got['identifier']} shape"], seed)
    assert np.array_equal(_pixels(a), _pixels(b))  # the word differs, its vector and the adapter do not
    assert {c["identifier"]: c["method"] for c in service.concepts("bob")}[got["identifier"]] == "lora"


def test_an_import_sent_again_with_its_idempotency_key_gets_the_first_ones_concept(service):
    r = service.finetune("alice", instance_images(4), FAST)
    files = service.export("alice", r["identifier"], "diffusers")
    params = {"category": "shape", "identifier": r["identifier"], "idempotency_key": "bob-import-1"}
    first = service.import_concept("bob", files, params)
    again = service.import_concept("bob", files, params)  # without the key: "you already have a concept ..."
    assert again == first and [c["identifier"] for c in service.concepts("bob")] == [r["identifier"]]
    with pytest.raises(Conflict, match="idempotency_key 'bob-import-1' was already used for another /import"):
        service.import_concept("bob", files, {**params, "category": "dog"})
    service.delete("bob", r["identifier"])
    with pytest.raises(Conflict, match="whose concept has since been deleted"):
        service.import_concept("bob", files, params)


def test_import_refuses_bad_files_and_keeps_nothing(service):
    from safetensors.torch import save

    r = service.finetune("alice", instance_images(4), FAST)
    lora = dict(service.export("alice", r["identifier"]))["pytorch_lora_weights.safetensors"]
    from safetensors.torch import load as load_bytes
    state = load_bytes(lora)
    key = next(k for k in state if "lora_A" in k)
    wrong = save({**state, key: torch.zeros(state[key].shape[0], state[key].shape[1] + 3)})
    before = len(os.listdir(service.ws.root + "/models"))
    for files, match in [([("x.pt", b"not a file")], "not an embedding"),
                         ([("l.safetensors", wrong)], "does not fit"),
                         ([("l.safetensors", save({"unet.nothing.lora_A.weight": torch.zeros(4, 4)}))],
                          "matches|does not fit"),
                         ([("a", lora), ("b", lora)], "one LoRA"),
                         ([], "send one")]:
        with pytest.raises(BadRequest, match=match):
            service.import_concept("bob", files, {"category": "shape"})
    service.config.limits = type(service.config.limits)(max_import_bytes=100)
    with pytest.raises(BadRequest, match="import limit"):
        service.import_concept("bob", [("l.safetensors", lora)], {"category": "shape"})
    assert len(os.listdir(service.ws.root + "/models")) == before
    assert service.concepts("bob") == []


# ---------------------------------------------------------------------------------------------- textual inversion
def test_textual_inversion_matches_plain_diffusers_and_combines_with_a_lora(service, tmp_path):
    from diffusers import StableDiffusionPipeline

    from big.weights.pipelines import resolve_base

    ti = service.finetune("alice", instance_images(4), {**FAST, "method": "textual_inversion", "num_vectors": 3,
                                                        "init_text": "orange heart"})
    folder = _version_dir(service, "alice", ti["identifier"])
    assert sorted(os.listdir(folder)) == sorted(["big_version.json", "learned_embeds.safetensors",
                                                 f"{ti['identifier']}.pt"])
    data = dict(service.export("alice", ti["identifier"], "diffusers"))["learned_embeds.safetensors"]
    (tmp_path / "e.safetensors").write_bytes(data)
    plain = StableDiffusionPipeline.from_pretrained(resolve_base("embedded"), safety_checker=None,
                                                    requires_safety_checker=False,
                                                    dtype=service.base_pipe.unet.dtype).to(service.device)
    plain.load_textual_inversion(str(tmp_path / "e.safetensors"), token="<t>")
    theirs = plain.encode_prompt("a <t> shape", service.device, 1, False)[0]
    vec = read_version(folder).embedding()
    tid = service.base_pipe.tokenizer(ti["identifier"], add_special_tokens=False).input_ids[0]
    ours = prompting.encode_prompts(service.base_pipe.tokenizer, service.base_pipe.text_encoder,
                                    [f"a {ti['identifier']} shape"], [""], service.device,
                                    embeddings={tid: embeddings.ConceptEmbedding(ti["identifier"], tid, vec)})[0]
    # Three vectors where the word was, as diffusers does (to fp16's rounding where the service runs in fp16).
    tol = 1e-5 if ours.dtype == torch.float32 else 1e-2
    assert torch.allclose(ours.float(), theirs.float(), atol=tol)

    lora = service.finetune("alice", instance_images(4, shape="star", colour="blue"), FAST)
    both = service.generate("alice", [f"a {ti['identifier']} painting of a {lora['identifier']} shape"],
                            {"target_model": "private", "seed": 1})
    assert both[0].parameters["model"] in (f"private:{ti['identifier']}+{lora['identifier']}",
                                           f"private:{lora['identifier']}+{ti['identifier']}")
    again = service.generate("alice", [], {"parameters": both[0].parameters_text()})
    assert np.array_equal(_pixels(both), _pixels(again))


def test_overwrite_retrains_an_existing_word_for_its_owner_only(service):
    r = service.finetune("alice", instance_images(4), {**FAST, "method": "textual_inversion", "overwrite": "star"})
    assert r["identifier"] == "star"
    params = {"seed": 2, "num_inference_steps": 6}
    base = service.generate("alice", ["a red star"], params)
    mine = service.generate("alice", ["a red star"], {**params, "target_model": "private", "identifiers": ["star"]})
    assert not np.array_equal(_pixels(base), _pixels(mine))
    with pytest.raises(BadRequest):  # an overwrite applies only when named
        service.generate("alice", ["a red star"], {**params, "target_model": "private"})
    with pytest.raises(Conflict):
        service.finetune("alice", instance_images(2), {**FAST, "method": "textual_inversion", "overwrite": "star"})
    with pytest.raises(BadRequest, match="textual_inversion mode"):
        service.finetune("alice", instance_images(2), {**FAST, "overwrite": "star"})


def test_delete_unloads_the_adapter_and_its_merged_routes(service):
    r = service.finetune("alice", instance_images(4), FAST)
    service.generate("alice", [f"a {r['identifier']} shape"], {"target_model": "private"})
    assert len(service.loras.loaded()) == 1
    assert len([k for k in service.cache.keys() if k.startswith("base@0+")]) == 1  # its merged route
    service.delete("alice", r["identifier"])
    assert service.loras.loaded() == [] and not [k for k in service.cache.keys() if k.startswith("base@0+")]
    with pytest.raises(BadRequest):
        service.generate("alice", [f"a {r['identifier']} shape"], {"target_model": "private"})


def test_a_lora_with_text_encoder_adapters_round_trips_through_plain_diffusers(service, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from big.weights.pipelines import resolve_base

    r = service.finetune("alice", instance_images(4), {**FAST, "lora_text_encoder": True,
                                                       "train_identifier_embedding": False})
    files = service.export("alice", r["identifier"])
    assert [name for name, _ in files] == ["pytorch_lora_weights.safetensors"]
    out = tmp_path / "export"
    out.mkdir()
    (out / files[0][0]).write_bytes(files[0][1])
    keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    ours = service.generate("alice", [f"a {r['identifier']} shape"], {
        "target_model": "private", "seed": 9, "num_inference_steps": 6})
    plain = StableDiffusionPipeline.from_pretrained(resolve_base("embedded"), safety_checker=None,
                                                    requires_safety_checker=False,
                                                    dtype=service.base_pipe.unet.dtype).to(service.device)
    plain.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert plain.get_list_adapters() and "text_encoder" in plain.get_list_adapters()
    theirs = plain(f"a {r['identifier']} shape", num_inference_steps=6, guidance_scale=service.generate_defaults[
        "guidance_scale"], generator=torch.Generator().manual_seed(9), height=32, width=32).images[0]
    assert np.abs(np.asarray(theirs, dtype=np.int16) - _pixels(ours)[0]).mean() < 1.0


def test_lora_tags_pick_a_concept_and_its_strength(service):
    assert prompting.lora_tags("a <lora:sks:0.5> shape, <lora:qzq>") == ("a shape,", {"sks": 0.5, "qzq": 1.0})
    r = service.finetune("alice", instance_images(4), FAST)
    ident, params = r["identifier"], {"target_model": "private", "seed": 3, "num_inference_steps": 6}
    full = service.generate("alice", [f"a {ident} shape <lora:{ident}:1>"], params)
    plain = service.generate("alice", [f"a {ident} shape"], params)
    assert np.array_equal(_pixels(full), _pixels(plain))  # weight 1 is the default; the tag is not encoded
    off = service.generate("alice", [f"a {ident} shape <lora:{ident}:0>"], params)
    half = service.generate("alice", [f"a {ident} shape <lora:{ident}:0.5>"], params)
    assert not np.array_equal(_pixels(off), _pixels(full)) and not np.array_equal(_pixels(half), _pixels(full))
    again = service.generate("alice", [], {"parameters": half[0].parameters_text()})
    assert np.array_equal(_pixels(again), _pixels(half))
    with pytest.raises(NotFound):
        service.generate("alice", [f"a {ident} shape <lora:nope:1>"], params)
    with pytest.raises(BadRequest, match="target_model 'private'"):
        service.generate("alice", [f"a shape <lora:{ident}:1>"], {"seed": 1})
