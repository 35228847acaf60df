"""LoRA settings on the personal-bench concept: fidelity per config and seed (JSON configs as argv[1]).

    python benchmarks/lora_settings.py '[{"max_train_steps": 590, "seed": 0, "snr_gamma": 5}]'   (N=32 images)
"""
import json, os, sys, tempfile, time
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch
torch.set_num_threads(2)
from conftest import instance_images
from big.storage.versions import read_version
from big.service import BIGService, ServiceConfig
from big.config import Limits
from benchmarks.personal_bench import score

configs = json.loads(sys.argv[1])
n = int(os.environ.get("N", 32))
images = instance_images(5, style="plain")
with tempfile.TemporaryDirectory() as tmp:
    svc = BIGService(ServiceConfig(workspace=tmp, auth={"mode": "disabled"}, limits=Limits(max_num_images=max(16, n))))
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
