"""Style x object compositions with extra guidance towards the object alone (composable diffusion), a lead
for the composition bar that the service does not use yet.

    python benchmarks/composition_guidance.py [--seeds 11 40] [--n 32] [--object-weights 0 4 8]

Teaches the four concepts of benchmarks/continual.py to one `adapters` metamodel (the service's own path), then
samples each "a {style} painting of a {object} shape" with a conjunction of noise predictions (Liu et al. 2022,
"Compositional Visual Generation with Composable Diffusion Models"):

    eps = mean_i eps_i(empty) + sum_i w_i (eps_i(p_i) - eps_i(empty))

term 1: the UNet with both adapters merged (the prompt's route, what /generate uses) on the composition prompt,
w = the default guidance 4; term 2 (object weight > 0): the UNet with the object's adapter alone on
"a {object} shape". Object weight 0 is plain classifier-free guidance through the route, i.e. what /generate does.
Images i use seed + i; the scorer reads every attribute of both concepts. Writes
reports/continual/composition_guidance.json and a contact sheet of the first images of each pair and weight.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from adapter_mixing import adapter_parts  # noqa: E402
from continual import SEQUENCE, teach_as_adapters  # noqa: E402
from executor.prompting import encode_prompts  # noqa: E402
from executor.service import BIGService, ServiceConfig  # noqa: E402
from shapes_world import evaluate  # noqa: E402
from shapes_world.scorer import Scorer  # noqa: E402
from shapes_world.sheets import contact_sheet  # noqa: E402


@torch.no_grad()
def conjunction(svc, embeds, terms, *, n: int, seed: int, steps: int = evaluate.DEFAULT_STEPS):
    """n images from the sum of the terms' guidance; terms: (unet, prompt, weight)."""
    pipe = svc.base_pipe
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)

    def states(prompt):
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt] * n, [""] * n, pipe.device,
                              dtype=torch.float32, embeddings=embeds)[0]

    side = svc.size // pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, side, side)
    latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])
    latents = latents * scheduler.init_noise_sigma
    conds = [(unet, states(prompt), states(""), weight) for unet, prompt, weight in terms]
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps = 0
        for unet, cond, empty, weight in conds:
            uncond_eps, cond_eps = unet(torch.cat([x, x]), t, torch.cat([empty, cond])).sample.chunk(2)
            eps = eps + uncond_eps / len(conds) + weight * (cond_eps - uncond_eps)
        latents = scheduler.step(eps, t, latents).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 40])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--object-weights", type=float, nargs="+", default=[0.0, 4.0, 8.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="reports/continual")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    attrs = {name: at for name, _, at in SEQUENCE}
    report = {"seeds": a.seeds, "n": a.n, "guidance": evaluate.DEFAULT_GUIDANCE, "pairs": {}}
    sheet = []
    with tempfile.TemporaryDirectory() as tmp:
        # Training gains nothing from a second thread on this UNet (benchmarks/continual.py).
        svc = BIGService(ServiceConfig(workspace=tmp, base_model="embedded", auth={"mode": "disabled"},
                                       train_threads=1))
        concepts = {name: c for name, _, _, c in teach_as_adapters(svc)}
        report["train_s"] = round(time.time() - t0, 1)
        parts = {k: adapter_parts(svc, c) for k, c in concepts.items()}  # (adapter name, folder, embedding)
        embeds = dict(p[2] for p in parts.values())
        runtime = svc._trunk_loras("meta", 0)

        def unet_with(*names):
            return runtime.fused_unet([(parts[k][0], parts[k][1], 1.0) for k in names])

        scorer = Scorer()
        for style in ("checker", "hollow"):
            for obj in ("heart-dot", "star-ring"):
                s, o = concepts[style]["identifier"], concepts[obj]["identifier"]
                prompt, want = f"a {s} painting of a {o} shape", {**attrs[style], **attrs[obj]}
                both, alone = unet_with(style, obj), unet_with(obj)
                rows = {}
                for w in a.object_weights:
                    terms = [(both, prompt, evaluate.DEFAULT_GUIDANCE)] + ([(alone, f"a {o} shape", w)] if w else [])
                    per_seed, per_attr = [], {k: [] for k in want}
                    for seed in a.seeds:
                        images = conjunction(svc, embeds, terms, n=a.n, seed=seed)
                        reads = scorer.read(images)
                        per_seed.append(float(np.mean([evaluate.shows(rd, want) for rd in reads])))
                        for k, v in want.items():
                            per_attr[k].append(float(np.mean([rd[k] == v for rd in reads])))
                        if seed == a.seeds[0]:
                            sheet += [(im, f"{prompt} +object {w:g}") for im in images[:4]]
                    rows[f"{w:g}"] = {"both_right": per_seed, "mean": round(float(np.mean(per_seed)), 3),
                                      "attributes": {k: round(float(np.mean(v)), 3) for k, v in per_attr.items()}}
                    print(f"{style} x {obj}, object weight {w:g}: both right {per_seed} "
                          f"{rows[f'{w:g}']['attributes']}", flush=True)
                report["pairs"][f"{style}x{obj}"] = rows
        svc.close()
    report["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "composition_guidance.json"), "w") as f:
        json.dump(report, f, indent=1)
    contact_sheet([im for im, _ in sheet], [c for _, c in sheet], columns=12,
                  title=f"compositions with guidance towards the object alone (seed {a.seeds[0]}..)").save(
        os.path.join(a.out, "composition_guidance.png"))
    print("\nmean over the seeds of the share of images with every attribute right")
    print("object weight  " + "  ".join(f"{p:>18s}" for p in report["pairs"]))
    for w in a.object_weights:
        print(f"{w:13g}  " + "  ".join(f"{report['pairs'][p][f'{w:g}']['mean']:18.2f}" for p in report["pairs"]))
    print(f"wall {report['wall_s']} s (training {report['train_s']} s)")


if __name__ == "__main__":
    main()
