"""A batch too large for the accelerator's memory is served in halves, with the same images; one image that does
not fit is a clear error. CPU torch never runs out of memory this way, so the UNet here raises torch's own
`OutOfMemoryError` (what CUDA raises) for batches above a chosen size."""
import logging

import pytest
import torch

from big.errors import OutOfMemory
from big.generation.sampling import halving_on_out_of_memory


def test_a_failing_batch_is_split_in_halves_until_each_part_fits(caplog):
    tried = []

    def run(items):
        tried.append(list(items))
        if len(items) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [10 * i for i in items]

    with caplog.at_level(logging.WARNING, logger="big.generation.sampling"):
        assert halving_on_out_of_memory(run, range(10), what="test images") == [10 * i for i in range(10)]
    assert tried == [list(range(10)), [0, 1, 2, 3, 4], [0, 1], [2, 3, 4], [5, 6, 7, 8, 9], [5, 6], [7, 8, 9]]
    assert "test images: out of accelerator memory with 10 images in one batch; retrying in batches of 5 and 5" \
        in caplog.text
    assert "generation_batch" in caplog.text


def test_one_image_that_does_not_fit_is_a_clear_error():
    def run(items):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore lines")

    with pytest.raises(OutOfMemory) as err:
        halving_on_out_of_memory(run, ["a"], what="1024x1024 images", advice="ask for a smaller height and width")
    assert err.value.code == "out_of_memory"
    assert str(err.value) == ("[out_of_memory] 1024x1024 images: one image does not fit in the accelerator's memory "
                              "(CUDA out of memory. Tried to allocate 9.00 GiB); ask for a smaller height and width")


def test_other_errors_are_not_retried():
    tried = []

    def run(items):
        tried.append(items)
        raise RuntimeError("a shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        halving_on_out_of_memory(run, [1, 2, 3, 4], what="x")
    assert len(tried) == 1






