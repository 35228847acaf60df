"""Private concepts by method: bytes, fidelity at equal wall time, and the cost of switching users' LoRAs.

    python -m benchmarks.personal_bench [--threads 2] [--n 32] [--out reports/personal]

1. Fidelity at equal wall time: DreamBooth trains with the embedded model's default steps; LoRA and textual
   inversion get as many steps as fit in the same training time (their time per step is measured first with
   a short run of each); LoRA is scored for 3 finetune seeds (--lora-seeds; each picks another identifier). The scorer reads n images of "a {id} shape" (seeds 5000.., printed) for the concept
   (an orange heart with a centre dot, 5 instance images), and the class prompt "a shape" with the concept
   applied (leak).
2. Bytes per private concept: the files stored for it against the base UNet's bytes; and the same ratio for
   Stable Diffusion 1.5 by arithmetic from its UNet's real architecture (built on the meta device, no weights).
3. Switching between two users' LoRA concepts: a 20-step single-image /generate for user A, and the time to
   switch the shared adapter set to user B's concept and back (`set_adapters`), plus the first load of an
   adapter from disk; ratios against the generate call, from the same run.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from benchmarks import harness
from benchmarks.service_bench import timed
from benchmarks.harness import instance_images
from big.storage.versions import read_version
from shapes_world.evaluate import shows
from shapes_world.scorer import Scorer
from big.generation.sheets import contact_sheet

CONCEPT = {"shape": "heart", "colour": "orange", "mark": "dot"}
OTHER = {"shape": "star", "colour": "blue", "mark": "ring"}
METHODS = {"dreambooth": {"method": "dreambooth"}, "lora": {"method": "lora"},
           "textual_inversion": {"method": "textual_inversion", "num_vectors": 4, "init_text": "shape"}}


def sd15_ratios(rank: int, targets: str, vectors: int) -> dict:
    """LoRA and embedding bytes against SD 1.5's UNet, counted on its real architecture (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from big.training.loop import LoraSettings

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD 1.x's UNet
        base = sum(p.numel() for p in unet.parameters())
        settings = LoraSettings(rank=rank, alpha=rank, targets=targets)
        unet.add_adapter(settings.config(settings.unet_targets))
        lora = sum(p.numel() for n, p in unet.named_parameters() if "lora" in n)
    return {"rank": rank, "targets": targets, "unet_params": base, "lora_params": lora, "lora_vs_unet": lora / base,
            "embedding_vectors": vectors, "embedding_vs_unet": vectors * 768 / base, "lora_fp16_mb": lora * 2 / 2**20}


def score(svc, user, ident, n, seed=5000):
    params = {"target_model": "private", "identifiers": [ident], "num_images": n, "seed": seed}
    inst = svc.generate(user, [f"a {ident} shape"], params)
    cls = svc.generate(user, ["a shape"], {**params, "seed": seed + 100_000})
    scorer = Scorer()
    ri, rc = scorer.read([g.image for g in inst]), scorer.read([g.image for g in cls])
    return (float(np.mean([shows(r, CONCEPT) for r in ri])), float(np.mean([shows(r, CONCEPT) for r in rc])),
            {k: float(np.mean([r[k] == v for r in ri])) for k, v in CONCEPT.items()}, inst)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="DreamBooth steps (default: the model's default)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lora-seeds", type=int, nargs="+", default=[10, 11, 12],
                    help="finetune seeds (they pick the identifier) for LoRA: held out from the ones (0-2) that chose "
                         "its settings in research/lora_settings.py")
    ap.add_argument("--calibration-steps", type=int, default=30, help="steps that time each method's step")
    ap.add_argument("--class-images", type=int, default=None, help="class images per job (default: the model's)")
    ap.add_argument("--out", default="reports/personal")
    a = harness.parse_args(ap, argv, smoke=dict(n=2, steps=4, repeat=1, lora_seeds=[10], calibration_steps=3,
                                                class_images=4))
    os.makedirs(a.out, exist_ok=True)
    report = {"threads": a.threads, "n": a.n, "seeds": "5000.. (concept), 105000.. (class prompt)"}
    images = instance_images(5, style="plain")
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, max_num_images=max(16, a.n),
                              finetune_defaults={"num_class_images": a.class_images} if a.class_images else {})
        db_steps = a.steps or svc.finetune_defaults["max_train_steps"]
        # 1. time per step of each method (short runs), then equal training time
        per_step = {}
        for name, extra in METHODS.items():
            r = svc.finetune(f"calib-{name}", images, {"category": "shape", "max_train_steps": a.calibration_steps,
                                                            **extra})
            meta = read_version(svc.registry.version_path(f"private:{r['concept_id']}", 1)).meta.to_dict()
            per_step[name] = meta["train_seconds"] / a.calibration_steps
        budget = per_step["dreambooth"] * db_steps
        rows, sheet, captions = [], [], []
        for name, extra in METHODS.items():
            steps = db_steps if name == "dreambooth" else int(budget / per_step[name])
            seeds = a.lora_seeds if name == "lora" else [0]
            extra_runs = []
            for seed in seeds[1:]:  # LoRA's fidelity varies with the identifier: score several
                rs = svc.finetune(f"u{seed}", images, {"category": "shape", "max_train_steps": steps, "seed": seed,
                                                       **extra})
                extra_runs.append(score(svc, f"u{seed}", rs["identifier"], a.n)[0])
            t = time.perf_counter()  # the reported run's own wall time, not the extra seeds'
            r = svc.finetune("u", images, {"category": "shape", "max_train_steps": steps, "seed": seeds[0], **extra})
            wall = time.perf_counter() - t
            folder = svc.registry.version_path(f"private:{r['concept_id']}", 1)
            fidelity, leak, per_attr, imgs = score(svc, "u", r["identifier"], a.n)
            unet_bytes = sum(p.numel() * p.element_size() for p in svc.base_pipe.unet.parameters())
            row = {"method": name, "steps": steps, "train_s": round(read_version(folder).meta.train_seconds, 1),
                   "finetune_wall_s": round(wall, 1), "fidelity": fidelity, "class_leak": leak,
                   "per_attribute": per_attr, "bytes": read_version(folder).bytes(),
                   "bytes_vs_unet": read_version(folder).bytes() / unet_bytes,
                   "files": read_version(folder).files()}
            if extra_runs:
                every = [fidelity] + extra_runs
                row.update(fidelity_per_seed=dict(zip(map(str, seeds), every)), fidelity_mean=float(np.mean(every)),
                           fidelity_min=float(min(every)))
                print(f"{name} fidelity per finetune seed {row['fidelity_per_seed']} mean {row['fidelity_mean']:.2f} "
                      f"min {row['fidelity_min']:.2f}", flush=True)
            rows.append(row)
            print(f"{name:18s} steps {steps:4d} train {row['train_s']:6.1f}s fidelity {fidelity:.2f} "
                  f"leak {leak:.2f} bytes {row['bytes']:>9d} ({row['bytes_vs_unet']:.2%} of the UNet) {per_attr}",
                  flush=True)
            sheet += [g.image for g in imgs[:8]]
            captions += [f"{name}: a {r['identifier']} shape"] * 8
        report["methods"] = rows
        report["seconds_per_step"] = {k: round(v, 4) for k, v in per_step.items()}
        contact_sheet(sheet, captions, columns=8, title="one concept, three methods, equal training time").save(
            os.path.join(a.out, "methods.png"))

        # 2. SD 1.5 by arithmetic
        report["sd15"] = [sd15_ratios(4, "attention", 4), sd15_ratios(1, "all", 4)]
        for r in report["sd15"]:
            print(f"SD 1.5: LoRA rank {r['rank']} on {r['targets']} = {r['lora_params']:,} params, "
                  f"{r['lora_vs_unet']:.3%} of the UNet's {r['unet_params']:,} ({r['lora_fp16_mb']:.1f} MB fp16); "
                  f"a 4-vector embedding {r['embedding_vs_unet']:.5%}", flush=True)

        # 3. switching two users' LoRAs
        ra = svc.finetune("user-a", images, {"category": "shape", "max_train_steps": 30})
        rb = svc.finetune("user-b", instance_images(5, style="plain", **OTHER), {"category": "shape",
                                                                                "max_train_steps": 30})
        gen = {"target_model": "private", "num_inference_steps": 20, "seed": 1}
        pa, pb = f"a {ra['identifier']} shape", f"a {rb['identifier']} shape"
        t = time.perf_counter()
        svc.generate("user-a", [pa], gen)  # first use: loads A's adapter from disk
        first_a = time.perf_counter() - t
        svc.generate("user-b", [pb], gen)
        same_user = timed(lambda: svc.generate("user-a", [pa], gen), a.repeat)

        def both():
            svc.generate("user-b", [pb], gen)
            svc.generate("user-a", [pa], gen)

        alternating = timed(both, a.repeat) / 2
        ca = svc.registry.find_concept(owner="user-a", target="private", identifier=ra["identifier"])
        cb = svc.registry.find_concept(owner="user-b", target="private", identifier=rb["identifier"])
        adapters = [svc.models.adapter_use(c) for c in (ca, cb)]
        switch = timed(lambda: (svc.loras.activate([adapters[1]]), svc.loras.activate([adapters[0]])), a.repeat) / 2
        svc.loras.drop(adapters[0][0])
        cold = timed(lambda: (svc.loras.drop(adapters[0][0]), svc.loras.activate([adapters[0]])), a.repeat)
        report["switching"] = {
            "generate_20_steps_same_user_s": round(same_user, 4),
            "generate_alternating_users_s": round(alternating, 4),
            "alternating_vs_same_user": round(alternating / same_user, 3),
            "switch_set_adapters_s": round(switch, 5), "switch_vs_generate": round(switch / same_user, 4),
            "first_load_from_disk_s": round(cold, 4), "first_load_vs_generate": round(cold / same_user, 3),
            "first_generate_with_load_s": round(first_a, 3)}
        print(json.dumps(report["switching"], indent=1), flush=True)
        svc.close()
    harness.write_json(os.path.join(a.out, "lora.json"), report)
    return report


if __name__ == "__main__":
    main()
