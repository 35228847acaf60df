"""LoRA settings on the personal-bench concept: fidelity per config and seed (JSON configs as argv[1]).

    python -m research.lora_settings '[{"max_train_steps": 590, "seed": 0, "snr_gamma": 5}]'   (N=32 images)
"""
import json
import os
import sys
import tempfile
import time

import torch

from benchmarks import harness
from benchmarks.personal_bench import score
from big.storage.versions import read_version

torch.set_num_threads(2)
configs = json.loads(sys.argv[1])
n = int(os.environ.get("N", 32))
images = harness.instance_images(5, style="plain")
with tempfile.TemporaryDirectory() as tmp:
    svc = harness.service(tmp, max_num_images=max(16, n))
    for cfg in configs:
        user = f"u{time.time_ns()}"
        t = time.perf_counter()
        r = svc.finetune(user, images, {"category": "shape", "method": "lora", **cfg})
        wall = time.perf_counter() - t
        meta = read_version(svc.registry.version_path(f"private:{r['concept_id']}", 1)).meta.to_dict()
        fid, leak, per, _ = score(svc, user, r["identifier"], n)
        print(json.dumps({"cfg": cfg, "ident": r["identifier"], "train_s": round(meta["train_seconds"], 1),
                          "fid": fid, "leak": leak, "mark": per["mark"], "loss": round(meta["final_loss"], 4)}), flush=True)
    svc.close()
