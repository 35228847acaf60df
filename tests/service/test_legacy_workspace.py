"""A workspace written before the core moved to `big/` (tests/fixtures/legacy_workspace, made by
make_legacy_workspace.py at a799f97) still serves: its concepts, its jobs, and the same images."""
import json
import os
import shutil
import sqlite3

import numpy as np
from PIL import Image

from big.service import BIGService, ServiceConfig

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "legacy_workspace")


def test_a_workspace_from_before_the_restructuring_serves_as_it_did(tmp_path):
    ws = str(tmp_path / "workspace")
    shutil.copytree(os.path.join(FIXTURE, "workspace"), ws)
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    svc = BIGService(ServiceConfig(workspace=ws, auth={"mode": "disabled"}))
    try:
        for user in ("alice", "bob"):
            assert svc.concepts(user) == expected["_concepts"][user]
        failed = expected["_jobs"]["failed"]
        # "[conflict] ...": the code survives the migration; where its seconds went was not recorded then
        assert svc.job("alice", failed["job_id"]) == {**failed, "seconds": None}
        columns = {r[1] for r in sqlite3.connect(os.path.join(ws, "registry.sqlite")).execute("PRAGMA table_info(jobs)")}
        assert "error_code" in columns
        for name, case in expected.items():
            if name.startswith("_"):
                continue
            img = svc.generate("alice", [case["prompt"]], {"seed": 5, "num_inference_steps": 6, **case["params"]})[0]
            assert img.parameters_text() == case["parameters"], name
            with Image.open(os.path.join(FIXTURE, "expected", f"{name}.png")) as im:
                then = np.asarray(im.convert("RGB"), dtype=np.int16)
            now = np.asarray(img.image, dtype=np.int16)
            # The same code path on another CPU may round differently: bounded as a GPU's rounding is.
            d = np.abs(now - then)
            assert d.mean() < 1.0 and np.quantile(d, 0.99) <= 8, (name, d.mean(), d.max())
    finally:
        svc.close()
