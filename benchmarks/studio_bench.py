"""Generation studio on the embedded model: does emphasis work, and what do sweeps and grids cost?

    python -m benchmarks.studio_bench [--threads 2] [--n 64] [--out reports/studio]

1. Emphasis: prompts that name two colours ("a red blue star") leave the colour to the model (it picks the
   first); the scorer reads n images per prompt (seeds fixed, printed) without and with the target colour
   emphasised ("(blue:1.5)", x2, x3) or the other one weighted down ("(red:0.67)", x0.5, x0), in each
   emphasis mode (`original`: AUTOMATIC1111's per-token scaling; `context`: ours, see executor/prompting.py),
   and the share of images in the target colour is printed before and after, with the mean gain per weight;
   "a (red:0) star" shows whether a weight reaches the colour at all.
2. Cost: a 0..30 guidance sweep (31 frames) and a 4x4 grid (4 prompts x 4 guidance scales), wall time and
   time per image, against a single-image /generate call in the same run (median of repeats).
Writes the sweep GIF, the grid sheet, an emphasis sheet and a JSON report to --out.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from benchmarks import harness
from benchmarks.service_bench import timed
from shapes_world.scorer import Scorer
from big.generation.sheets import contact_sheet

PAIRS = [("red", "blue", "star"), ("green", "yellow", "circle"), ("purple", "orange", "square")]
UP_WEIGHTS = (1.5, 2, 3)
DOWN_WEIGHTS = (0.67, 0.5, 0)


def colour_share(svc, scorer, prompt, colour, n, seed, steps, emphasis):
    imgs = svc.generate("bench", [prompt], {"num_images": n, "seed": seed, "num_inference_steps": steps,
                                            "emphasis": emphasis})
    reads = scorer.read([g.image for g in imgs])
    return float(np.mean([r["colour"] == colour for r in reads])), imgs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--weight", type=float, default=1.5)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="reports/studio")
    a = harness.parse_args(ap, argv, smoke=dict(n=2, steps=4, repeat=1))
    os.makedirs(a.out, exist_ok=True)
    scorer = Scorer()
    report = {"threads": a.threads, "n": a.n, "seed": a.seed, "steps": a.steps, "weight": a.weight}
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp, max_num_images=max(16, a.n))

        # 1. emphasis. The model paints the first of two colours, so the target is the second one: raised by
        # weighting it up or the first one down, over a range of weights (the effect has a threshold).
        rows, sheet, captions = [], [], []
        for mode in ("original", "context"):
            for first, second, shape in PAIRS:
                plain = f"a {first} {second} {shape}"
                before, _ = colour_share(svc, scorer, plain, second, a.n, a.seed, a.steps, mode)
                cases = [(plain.replace(second, f"({second}:{w})"), second, w) for w in UP_WEIGHTS]
                cases += [(plain.replace(first, f"({first}:{w})"), first, w) for w in DOWN_WEIGHTS]
                for emphasised, word, w in cases:
                    after, imgs = colour_share(svc, scorer, emphasised, second, a.n, a.seed, a.steps, mode)
                    rows.append({"mode": mode, "prompt": plain, "emphasised": emphasised, "colour": second,
                                 "weighted_word": word, "weight": w,
                                 "share_before": round(before, 3), "share_after": round(after, 3)})
                    print(f"{mode:8s} {emphasised:32s} {second:7s} share {before:.2f} -> {after:.2f}", flush=True)
                    if mode == "context":
                        sheet += [g.image for g in imgs[:6]]
                        captions += [emphasised] * 6
            # Does a weight reach the colour at all? Weight 0 on the only colour word.
            for colour, shape in (("red", "star"), ("green", "circle")):
                plain, zeroed = f"a {colour} {shape}", f"a ({colour}:0) {shape}"
                before, _ = colour_share(svc, scorer, plain, colour, a.n, a.seed, a.steps, mode)
                after, _ = colour_share(svc, scorer, zeroed, colour, a.n, a.seed, a.steps, mode)
                rows.append({"mode": mode, "prompt": plain, "emphasised": zeroed, "colour": colour,
                             "weighted_word": colour, "weight": "zeroed only colour",
                             "share_before": round(before, 3), "share_after": round(after, 3)})
                print(f"{mode:8s} {zeroed:32s} {colour:7s} share {before:.2f} -> {after:.2f}", flush=True)
        gains = {}
        for mode in ("original", "context"):
            for word_is_target, weights in ((True, UP_WEIGHTS), (False, DOWN_WEIGHTS)):
                for w in weights:
                    sel = [r for r in rows if r["mode"] == mode and r["weight"] == w
                           and (r["weighted_word"] == r["colour"]) == word_is_target]
                    label = f"{mode} {'target' if word_is_target else 'other colour'} x{w}"
                    gains[label] = round(100 * float(np.mean([r["share_after"] - r["share_before"] for r in sel])), 1)
        report["emphasis"] = {"rows": rows, "seeds": f"{a.seed}..{a.seed + a.n - 1}",
                              "mean_gain_points": gains}
        print("mean gain of the target colour's share, points:")
        for label, g in gains.items():
            print(f"  {label:32s} {g:+6.1f}")
        contact_sheet(sheet, captions, columns=6, title="emphasis (context mode)").save(
            os.path.join(a.out, "emphasis.png"))

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
    harness.write_report(a.out, "studio", report)
    return report


if __name__ == "__main__":
    main()
