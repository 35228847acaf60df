"""Sweeps and grids: planning (pure), batching, and that every frame is an ordinary reproducible image."""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import assert_same_image

from big.errors import BadRequest


def test_a_guidance_sweep_is_batched_and_each_frame_reproduces_alone(service):
    frames, gif = service.sweep("alice", ["a blue star"], {"seed": 4, "num_inference_steps": 4, "values": [0, 1, 3, 9]})
    assert [f.parameters["guidance_scale"] for f in frames] == [0, 1, 3, 9] and {f.seed for f in frames} == {4}
    with Image.open(io.BytesIO(gif)) as im:
        assert im.format == "GIF" and im.n_frames == 4
    for f in frames:  # frames 3 and 9 were made in one call with per-image guidance
        again = service.generate("alice", [], {"parameters": f.parameters_text()})[0]
        assert_same_image(again, f, service.device)
    assert not np.array_equal(np.asarray(frames[2].image), np.asarray(frames[3].image))


def test_a_grid_returns_every_image_and_a_captioned_sheet(service):
    images, sheet = service.grid("alice", ["a red heart", "a green cross"], {
        "guidance_scales": [2, 5], "steps": [3], "num_seeds": 2, "seed": 10})
    assert len(images) == 8 and [i.seed for i in images[:4]] == [10, 11, 10, 11]
    with Image.open(io.BytesIO(sheet)) as im:
        assert im.format == "PNG" and im.width > 4 * 32
    with pytest.raises(BadRequest, match="at most"):
        service.grid("alice", ["x"], {"num_seeds": 200, "guidance_scales": [1, 2]})
    # Counted before the grid is built: 10^9 combinations are refused at once, not allocated.
    long = {"guidance_scales": [1.0] * 1000, "steps": [3] * 1000, "seeds": list(range(1000))}
    with pytest.raises(BadRequest, match="this one: 1000000000"):
        service.grid("alice", ["x"], long)
    with pytest.raises(BadRequest, match="at most"):
        service.sweep("alice", ["x"], {"num": 10**12})
