"""The continual-learning benchmark's smoke preset: the service's default metamodel strategy keeps a first
concept that naive sequential DreamBooth forgets (the full bars are printed by benchmarks/continual.py)."""
import json
import os

from benchmarks.continual import PRESETS, run_strategy
from conftest import BASE_MODEL
from executor.service import DEFAULT_FINETUNE
from shapes_world.scorer import Scorer


def test_smoke_default_strategy_keeps_what_naive_forgets(tmp_path):
    scorer = Scorer()
    default = DEFAULT_FINETUNE["metamodel_strategy"]
    assert default != "naive"
    res = {s: run_strategy(s, seed=0, scorer=scorer, out_dir=str(tmp_path), base_model=BASE_MODEL,
                           **PRESETS["smoke"]) for s in ("naive", default)}
    print(json.dumps(res, indent=1))
    first = lambda s, step: res[s]["rows"][step]["fidelity"]["heart-dot"]  # noqa: E731
    # Measured (seed 0, this short preset): naive learns the first concept to 0.42 and keeps 0.00 of it after
    # the second; the default (adapters, rank 4) learns it to 1.00 and keeps 1.00 (its images do not change).
    assert first(default, 0) >= 0.3
    assert first(default, 1) >= first("naive", 1) + 0.25  # and kept, where naive lost it
    assert os.path.exists(tmp_path / f"{default}_step2.png")
