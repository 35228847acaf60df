import atexit
import os
import shutil
import tempfile

import pytest

# hubble keeps its config (and cached JWKS) under JINA_HUB_ROOT: keep tests away from ~/.jina, in a folder the
# session removes. Only the process that makes it removes it: spawned children import this file again (through
# the test modules) with the variable inherited, and must neither make another folder nor delete this one.
if "JINA_HUB_ROOT" not in os.environ:
    os.environ["JINA_HUB_ROOT"] = tempfile.mkdtemp(prefix="big-test-hub-")
    atexit.register(shutil.rmtree, os.environ["JINA_HUB_ROOT"], ignore_errors=True)

os.environ.setdefault("JINA_LOG_LEVEL", "ERROR")
os.environ.setdefault("JINA_HIDE_SURVEY", "1")
os.environ.setdefault("JINA_OPTOUT_TELEMETRY", "1")
os.environ.setdefault("JINA_MP_START_METHOD", "spawn")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The README's test command runs the suite in pytest-xdist workers (pytest.ini's `-n`): each worker has its share of
# the cores, and every process it starts (flows, training workers, a benchmark's strategies) inherits that share.
# Waiting OpenMP threads sleep instead of spinning, so a process's team does not burn the core another one needs.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)

from benchmarks.harness import instance_images  # noqa: E402,F401 - the tests' concept images, as the benchmarks'
from shapes_world.model import DEFAULT_MODEL_DIR  # noqa: E402


TIERS = {"unit": "no model loaded", "service": "the service in-process on the embedded model",
         "integration": "a real jina flow over gRPC, the CLI, the notebook", "bench_smoke": "benchmarks' smoke presets"}
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


# The order the files are handed to the workers (pytest.ini: `--dist loadfile --no-loadscope-reorder`): the longest
# tests first (the continual smoke, one test of minutes), so that the workers end together on short ones.
TIER_ORDER = ("bench_smoke", "integration", "service", "unit")


def pytest_collection_modifyitems(config, items):
    """Each test is marked with its tier (the folder it is in), so `-m "not bench_smoke"` and the like select."""
    tiers = {}
    for item in items:
        tiers[item.nodeid] = next((t for t in TIERS if t in item.path.parts), None)
        if tiers[item.nodeid]:
            item.add_marker(getattr(pytest.mark, tiers[item.nodeid]))
    items.sort(key=lambda item: TIER_ORDER.index(tiers[item.nodeid]) if tiers[item.nodeid] else len(TIER_ORDER))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's threads (a benchmark's `--threads`, an in-process Executor's `serve_threads`) leaves
    the next one the worker's share."""
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _unit_tier_loads_no_model(request, monkeypatch):
    """tests/unit is the quick loop: a test there that loads the embedded model's or scorer's weights fails."""
    if "unit" not in request.node.path.parts:
        yield
        return
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    def guarded(original):
        def load(cls, path, *args, **kwargs):
            if str(path).startswith(MODELS_DIR):
                raise AssertionError(f"tests/unit loads no model ({path}): move this test to tests/service")
            return original.__func__(cls, path, *args, **kwargs)
        return classmethod(load)

    for owner in (DiffusionPipeline, ModelMixin, PreTrainedModel):
        monkeypatch.setattr(owner, "from_pretrained", guarded(owner.__dict__["from_pretrained"]))
    yield


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from shapes_world.tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(DEFAULT_MODEL_DIR, "tokenizer"))


BASE_MODEL = os.environ.get("BIG_TEST_BASE_MODEL", "embedded")
SECRET = "integration-test-secret-0123456789abcdef"


def assert_same_image(a, b, device) -> None:
    """The same recipe made twice, alone and in a batch of another size. On the CPU the pixels are equal. A GPU
    runs fp16 kernels chosen per batch size, so there the two agree to within rounding: on average under one
    level and in 99% of pixels by at most 8 (an H200 moved at most one pixel by one level; images of another
    seed differ by about 20 levels on average)."""
    x, y = (np.asarray(getattr(i, "image", i), dtype=np.int16) for i in (a, b))
    assert x.shape == y.shape
    if torch.device(device).type == "cpu":
        assert np.array_equal(x, y)
        return
    d = np.abs(x - y)
    report = f"same image on {device}: mean {d.mean():.3f}, p99 {np.quantile(d, 0.99)}, max {d.max()}"
    print(report)
    assert d.mean() < 1.0 and np.quantile(d, 0.99) <= 8, report


def assert_same_but_rounding(a, b, device) -> None:
    """Lists of the same images up to float rounding: u + 4(c - u) + 4(c - u) against u + 8(c - u), or an image
    made alone against the same image made in a larger batch. On some CPUs (an AMD EPYC here) that moves a
    pixel by one level in under 1% of pixels; elsewhere the bytes are equal. In fp16 on a GPU (an H200) it
    moved 5% of pixels by one level, within `assert_same_image`'s bound for a GPU."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x, y = (np.asarray(getattr(i, "image", i), dtype=np.int16) for i in (x, y))
        if torch.device(device).type == "cpu":
            assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.01
        else:
            assert_same_image(x, y, device)


@pytest.fixture(scope="session")
def shared_class_images(tmp_path_factory):
    """The base model's class images of the categories the tests teach, made once per session: a service
    shares them among all its users, and the cache's index-derived seeds make them the images each test
    would make itself (to float rounding: here they come from one batch of 16). Copied into each `service`;
    a test of the cache itself starts by removing them."""
    from big.service import BIGService, ServiceConfig

    ws = tmp_path_factory.mktemp("class-images-ws")
    svc = BIGService(ServiceConfig(workspace=str(ws), base_model=BASE_MODEL, auth={"mode": "disabled"}))
    for category in ("shape", "painting"):
        svc.prior_class_images(category, 16)
    svc.close()
    return ws / "class_images"


@pytest.fixture
def service(tmp_path, shared_class_images):
    from big.service import BIGService, ServiceConfig

    shutil.copytree(shared_class_images, tmp_path / "ws" / "class_images")
    # The model card's per-method (LoRA) and per-strategy steps win over a shared max_train_steps: all are set short.
    short = {"max_train_steps": 8, "num_class_images": 4, "per_method": {"lora": {"max_train_steps": 8}},
             "per_strategy": {"adapters": {"max_train_steps": 8}}}
    svc = BIGService(ServiceConfig(workspace=str(tmp_path / "ws"), base_model=BASE_MODEL,
                                   auth={"mode": "hs256", "secret": SECRET}, finetune_defaults=short,
                                   generate_defaults={"num_inference_steps": 4}))
    yield svc
    svc.close()


@pytest.fixture(scope="session")
def scorer():
    from shapes_world.scorer import Scorer

    return Scorer()


# PostgreSQL: every machine of this project (CI included) runs one on 127.0.0.1:5432 with trust auth. Tests that
# need it get a database of their own, made for them and dropped after; when none answers they are skipped with
# the reason, never passed silently (BIG_TEST_POSTGRES_URL points elsewhere).
def postgres_database(prefix: str):
    """A generator for a fixture: a fresh PostgreSQL database's URL, dropped after; skips when none answers."""
    from benchmarks.harness import POSTGRES_ADMIN_URL, scratch_postgres

    with scratch_postgres(prefix) as url:
        if url is None:
            pytest.skip(f"PostgreSQL does not answer at {POSTGRES_ADMIN_URL}; start it or set BIG_TEST_POSTGRES_URL")
        yield url


@pytest.fixture
def postgres_url():
    yield from postgres_database("big_test")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """The registry's two backends: a SQLite file, and a PostgreSQL database of the test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite'}"
    return request.getfixturevalue("postgres_url")


def pngs(images):
    """Images as the ImageDocs a client sends to /finetune."""
    import io

    from docarray import DocList
    from docarray.documents import ImageDoc

    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(ImageDoc(bytes_=buf.getvalue()))
    return DocList[ImageDoc](out)


def terminate_connections(admin_engine, database: str) -> int:
    """`pg_terminate_backend` of every connection to `database` but the asking one (what a restart or failover does to
    them): how many were cut."""
    import sqlalchemy as sa

    with admin_engine.connect() as conn:
        return len(conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d "
                                        "AND pid <> pg_backend_pid()"), {"d": database}).all())
