"""Generation studio on the embedded model: does emphasis work, and what do sweeps and grids cost?

    python benchmarks/studio_bench.py [--threads 2] [--n 64] [--out reports/studio]

1. Emphasis: prompts that name two colours ("a red blue star") leave the colour to the model; the scorer
   reads n images per prompt (seeds fixed, printed) without and with "(red:1.5)" / "(blue:1.5)", and the
   share of images in the emphasised colour is printed before and after; and "a (red:0) star", the colour
   word's own states zeroed, shows where the model reads the colour from.
2. Cost: a 0..30 guidance sweep (31 frames) and a 4x4 grid (4 prompts x 4 guidance scales), wall time and
   time per image, against a single-image /generate call in the same run (median of repeats).
Writes the sweep GIF, the grid sheet, an emphasis sheet and a JSON report to --out.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.service_bench import timed  # noqa: E402
from executor.service import BIGService, ServiceConfig  # noqa: E402
from executor.validation import Limits  # noqa: E402
from shapes_world.scorer import Scorer  # noqa: E402
from shapes_world.sheets import contact_sheet  # noqa: E402

PAIRS = [("red", "blue", "star"), ("green", "yellow", "circle"), ("purple", "orange", "square")]


def colour_share(svc, scorer, prompt, colour, n, seed, steps):
    imgs = svc.generate("bench", [prompt], {"num_images": n, "seed": seed, "num_inference_steps": steps})
    reads = scorer.read([g.image for g in imgs])
    return float(np.mean([r["colour"] == colour for r in reads])), imgs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--weight", type=float, default=1.5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="reports/studio")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    scorer = Scorer()
    report = {"threads": a.threads, "n": a.n, "seed": a.seed, "steps": a.steps, "weight": a.weight}
    with tempfile.TemporaryDirectory() as tmp:
        svc = BIGService(ServiceConfig(workspace=tmp, base_model="embedded", auth={"mode": "disabled"},
                                       limits=Limits(max_num_images=max(16, a.n))))

        # 1. emphasis
        rows, sheet, captions = [], [], []
        for first, second, shape in PAIRS:
            plain = f"a {first} {second} {shape}"
            for target in (first, second):
                emphasised = plain.replace(target, f"({target}:{a.weight})")
                before, _ = colour_share(svc, scorer, plain, target, a.n, a.seed, a.steps)
                after, imgs = colour_share(svc, scorer, emphasised, target, a.n, a.seed, a.steps)
                rows.append({"prompt": plain, "emphasised": emphasised, "colour": target,
                             "share_before": round(before, 3), "share_after": round(after, 3)})
                print(f"{emphasised:32s} {target:7s} share {before:.2f} -> {after:.2f}", flush=True)
                sheet += [g.image for g in imgs[:6]]
                captions += [emphasised] * 6
        # Where does the model read a colour from? Zero the colour word's own states: if the colour stays,
        # it is read from the later (shape, end-of-text) states that causal attention filled with it, and
        # per-token emphasis has little to act on.
        for colour, shape in (("red", "star"), ("green", "circle")):
            plain, zeroed = f"a {colour} {shape}", f"a ({colour}:0) {shape}"
            before, _ = colour_share(svc, scorer, plain, colour, a.n, a.seed, a.steps)
            after, _ = colour_share(svc, scorer, zeroed, colour, a.n, a.seed, a.steps)
            rows.append({"prompt": plain, "emphasised": zeroed, "colour": colour,
                         "share_before": round(before, 3), "share_after": round(after, 3)})
            print(f"{zeroed:32s} {colour:7s} share {before:.2f} -> {after:.2f}", flush=True)
        report["emphasis"] = {"rows": rows, "mean_gain_points": round(
            100 * float(np.mean([r["share_after"] - r["share_before"] for r in rows if ":0)" not in r["emphasised"]])), 1)}
        contact_sheet(sheet, captions, columns=6, title="emphasis").save(os.path.join(a.out, "emphasis.png"))

        # 2. cost: single-image /generate vs sweep and grid, same process
        gen = {"num_inference_steps": a.steps, "seed": 1}
        svc.generate("bench", ["a red star"], gen)  # warm up
        single = timed(lambda: svc.generate("bench", ["a red star"], gen), a.repeat)
        t0 = time.perf_counter()
        frames, gif = svc.sweep("bench", ["a red star on a black background"], {**gen, "seed": 7})
        sweep_s = time.perf_counter() - t0
        with open(os.path.join(a.out, "guidance_sweep.gif"), "wb") as f:
            f.write(gif)
        t0 = time.perf_counter()
        images, grid_png = svc.grid("bench", ["a red star", "a blue heart", "a green cross", "a yellow circle"],
                                    {**gen, "guidance_scales": [2, 4, 8, 12], "seed": 3})
        grid_s = time.perf_counter() - t0
        with open(os.path.join(a.out, "grid_4x4.png"), "wb") as f:
            f.write(grid_png)
        svc.close()
    report["cost"] = {
        "single_generate_s": round(single, 3),
        "sweep_31_frames_s": round(sweep_s, 2), "sweep_per_image_s": round(sweep_s / len(frames), 3),
        "sweep_per_image_vs_single": round(sweep_s / len(frames) / single, 2),
        "grid_16_images_s": round(grid_s, 2), "grid_per_image_s": round(grid_s / len(images), 3),
        "grid_per_image_vs_single": round(grid_s / len(images) / single, 2)}
    print(json.dumps(report, indent=1))
    with open(os.path.join(a.out, "studio.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
