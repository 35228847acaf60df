"""Every refusal is ours: image bombs, oversized images, non-finite tensors, absurd imported weights and odd
user ids get a BadRequest (or AuthError) that names the input and says why."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from docarray.documents import ImageDoc
from safetensors.torch import save

from big.auth import mint_token
from big.config import Limits
from big.errors import BadRequest
from big.storage.versions import check_magnitude, read_lora_bytes
from executor.decode import decode_instance_images


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that declares a `width` x `height` 1-bit image (what an image bomb looks like)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def real_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_bomb_is_a_bad_request_naming_the_image():
    with pytest.raises(BadRequest, match=r"image 1: its header declares more than \d+ pixels \(a decompression bomb\)"):
        decode_instance_images([ImageDoc(bytes_=real_png()), ImageDoc(bytes_=png_header_only(30000, 30000))], Limits())


def test_an_oversized_image_keeps_the_services_own_message():
    with pytest.raises(BadRequest, match=r"image 0: 12000x12000 is 144000000 pixels; at most 16777216"):
        decode_instance_images([ImageDoc(bytes_=png_header_only(12000, 12000))], Limits())


def test_image_bytes_and_tensors_are_checked_against_the_limits():
    with pytest.raises(BadRequest, match=r"image 0: 0\.0 MiB; at most"):
        decode_instance_images([ImageDoc(bytes_=png_header_only(64, 64))], Limits(max_image_bytes=10))
    with pytest.raises(BadRequest, match="image 0: the tensor must hold finite numbers"):
        decode_instance_images([ImageDoc(tensor=np.full((64, 64, 3), np.nan, dtype=np.float32))], Limits())
    with pytest.raises(BadRequest, match="image 0: 5000x4000 is"):
        decode_instance_images([ImageDoc(tensor=np.zeros((4000, 5000, 3), dtype=np.uint8))], Limits())


def test_imported_weights_that_would_overflow_are_refused():
    huge = {"unet.a.lora_A.weight": torch.full((4, 8), 1e30), "unet.a.lora_B.weight": torch.ones(8, 4)}
    with pytest.raises(BadRequest, match=r"the LoRA has weights up to 1e\+30; at most 10000"):
        read_lora_bytes(save(huge), Limits().max_weight_magnitude)
    assert read_lora_bytes(save({k: v.clamp(max=1.0) for k, v in huge.items()}), 1e4) is not None
    with pytest.raises(BadRequest, match="e.pt has weights up to"):
        check_magnitude([torch.full((1, 8), -5e4)], 1e4, "e.pt")


@pytest.mark.parametrize("user", ["..", ".", ".hidden", "-x", "a/b", "", "x" * 129])
def test_user_ids_follow_one_pattern(user):
    with pytest.raises(Exception, match="sub"):
        mint_token(user, "secret-0123456789-abcdefghijklmnop")


@pytest.mark.parametrize("user", ["alice", "a..b", "user@example.com", "auth0:123", "x" * 128])
def test_ordinary_user_ids_pass(user):
    assert mint_token(user, "secret-0123456789-abcdefghijklmnop")


def test_every_flow_file_has_the_limits_message_size_and_bigs_gateway():
    """Each flow refuses messages larger than any request within the default limits, before reading them, and
    runs BIG's gateway (NaN refused by name); Kubernetes' export too, from Dockerfile.gateway's image."""
    import os

    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    for name in ("flow.yml", "deploy/flow-serving.yml", "deploy/flow-k8s.yml"):
        with open(os.path.join(root, name)) as f:
            flow = yaml.safe_load(f)
        assert flow["with"]["grpc_server_options"]["grpc.max_receive_message_length"] == Limits().max_message_bytes
        assert flow["gateway"] == ({"uses": "docker://big-gateway:latest"} if "k8s" in name else
                                   {"uses": "BIGGateway", "py_modules": ["executor.gateway"], "extra_search_paths": []}), name
    with open(os.path.join(root, "deploy/k8s/exported/gateway/gateway.yml")) as f:
        exported = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "Deployment"][0]
    container = exported["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "big-gateway:latest" and "config.yml" in container["args"]
    assert str(Limits().max_message_bytes) in " ".join(container["args"])
    assert 2 * Limits().max_import_bytes < Limits().max_message_bytes < 300 * 10**6


def test_the_gateway_names_the_first_non_finite_parameter_in_a_request():
    from jina.types.request.data import DataRequest

    from executor.gateway import _refusal, non_finite_parameter

    req = DataRequest()
    req.parameters = {"jwt": {"token": "t"}, "seed": 1, "grid": {"steps": [4, 8], "guidance_scales": [2.0, float("-inf")]}}
    assert non_finite_parameter(req.proto_wo_data.parameters) == "grid.guidance_scales.1 must be a finite number, not -inf"
    answer = _refusal(req)
    assert answer.header.status.exception.name == "BadRequest"
    assert list(answer.header.status.exception.args) == ["grid.guidance_scales.1 must be a finite number, not -inf"]
    req.parameters = {"guidance_scale": float("nan")}
    assert non_finite_parameter(req.proto_wo_data.parameters) == "guidance_scale must be a finite number, not nan"
    req.parameters = {"guidance_scale": 7.5, "prompts": ["nan", "inf"]}  # words are words
    assert _refusal(req) is None


def test_the_gateway_answers_an_undocumented_error_as_a_bigerror_and_no_error_with_the_servers_stack():
    from jina.types.request.data import DataRequest

    from big.errors import NotFound
    from executor.gateway import _answered

    def failed(error: Exception) -> DataRequest:
        answer = DataRequest()
        answer.header.request_id = "r1"
        try:
            raise error
        except Exception as e:  # noqa: BLE001 - with its traceback, as Jina's executor side adds it
            answer.add_exception(e)
        return answer

    store = failed(NotADirectoryError(20, "Not a directory", "/srv/big/store/tmp/job.1"))
    status = _answered(store).header.status
    assert status.exception.name == "BIGError" and list(status.exception.stacks) == []
    assert list(status.exception.args) == ["the server could not answer this request (NotADirectoryError); its log "
                                           "has the details under request id r1"]
    assert "/srv/big" not in str(status)
    status = _answered(failed(NotFound("no concept 'qzq' of yours"))).header.status
    assert (status.exception.name, list(status.exception.args)) == ("NotFound", ["no concept 'qzq' of yours"])
    assert list(status.exception.stacks) == [] and "Traceback" not in str(status)
    assert _answered(DataRequest()).header.status.code == 0  # an answer without an error passes as it is
