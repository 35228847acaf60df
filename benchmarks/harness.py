"""What every benchmark shares: the service it measures, the concepts' images, timing, presets and reports.

Run a benchmark from the repository root as a module (`python -m benchmarks.service_bench`); each has a
`--preset smoke` that the test suite runs (tests/bench_smoke), so none can break unseen.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time
from typing import Callable

import torch

from big.config import Limits, ServiceConfig
from big.generation.sheets import captioned_sheet
from big.service import BIGService
from shapes_world import world

# The concept most benchmarks and tests teach: an orange heart with a centre dot (category "shape").
HEART_DOT = dict(shape="heart", colour="orange", mark="dot")


def service(workspace: str, **config) -> BIGService:
    """A service on the embedded model (unless `base_model` says otherwise) with auth off, in `workspace`;
    `max_num_images` raises the per-request image limit for benchmarks that score many images at once."""
    limits = Limits(max_num_images=config.pop("max_num_images")) if "max_num_images" in config else Limits()
    return BIGService(ServiceConfig(workspace=workspace, auth={"mode": "disabled"}, limits=limits, **config))


def scene_images(n: int, seed: int, **spec) -> list:
    """`n` rendered scenes of the embedded world with these attributes (shape, colour, mark, style...)."""
    rng = random.Random(seed)
    return [world.render(world.random_scene(rng, **spec)) for _ in range(n)]


def instance_images(n: int = 4, seed: int = 0, **attrs) -> list:
    """Instance images of one concept at 64 px (default: the orange heart with a centre dot, plain)."""
    spec = dict(HEART_DOT, style="plain")
    spec.update(attrs)
    return [im.resize((64, 64)) for im in scene_images(n, seed, **spec)]


def concept_images(attrs: dict, n: int, seed: int, captions: bool = True):
    """(images, captions): a style is many subjects in that style, each captioned with its subject (as a user
    following the [filewords] habit would); an object's images need no caption."""
    rng = random.Random(seed)
    if "style" in attrs:
        scenes = [world.random_scene(rng, style=attrs["style"]) for _ in range(n)]
        return [world.render(s) for s in scenes], ([f"a {s.colour} {s.shape}" for s in scenes] if captions else None)
    return [world.render(world.random_scene(rng, style="plain", **attrs)) for _ in range(n)], None


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(ap: argparse.ArgumentParser, argv, smoke: dict) -> argparse.Namespace:
    """The benchmark's arguments, with `--preset smoke` setting the `smoke` values (the test suite's run)."""
    ap.add_argument("--preset", choices=("full", "smoke"), default="full",
                    help="smoke: a seconds-long run of every part, as the test suite makes it")
    a = ap.parse_args(argv)
    if a.preset == "smoke":
        for k, v in smoke.items():
            setattr(a, k, v)
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    return a


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def write_report(out_dir: str, stem: str, report: dict, cells=None, **sheet_kw) -> None:
    """`{stem}.json` in `out_dir` (made if missing) and, when `cells` ((image, caption) pairs) are given,
    `{stem}.png`, their captioned sheet (`sheet_kw`: contact_sheet's columns, title...)."""
    write_json(os.path.join(out_dir, f"{stem}.json"), report)
    if cells:
        captioned_sheet(cells, **sheet_kw).save(os.path.join(out_dir, f"{stem}.png"))


POSTGRES_ADMIN_URL = os.environ.get("BIG_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def scratch_postgres(prefix: str = "big_scratch", admin_url: str = POSTGRES_ADMIN_URL):
    """A PostgreSQL database made for the caller and dropped after: its SQLAlchemy URL, or None when no server
    answers at `admin_url` (every machine of this project runs one at 127.0.0.1:5432, trust auth)."""
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except Exception:  # noqa: BLE001 - no server, or no right to make a database
        admin.dispose()
        yield None
        return
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
