import os

import pytest

os.environ.setdefault("JINA_LOG_LEVEL", "ERROR")
os.environ.setdefault("JINA_HIDE_SURVEY", "1")
os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")
os.environ.setdefault("JINA_MP_START_METHOD", "spawn")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)

from shapes_world.model import DEFAULT_MODEL_DIR  # noqa: E402


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from shapes_world.tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(DEFAULT_MODEL_DIR, "tokenizer"))
