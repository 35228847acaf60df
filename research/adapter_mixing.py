"""Why the `adapters` metamodel routes adapters by prompt, and what mixing two of them does to a composition.

    python -m research.adapter_mixing [--n 32] [--seed 0]

Teaches the four concepts of benchmarks/continual.py to one metamodel with the `adapters` strategy (the
service's own path), then scores, with the same prompts and seeds as continual.py:
  routed   what /generate does: a prompt gets the adapters of the identifiers it names
  merged   every adapter on for every prompt (as if they were fused into one model): each concept's
           fidelity, the base prompts' accuracy and the class prompts' leak
  and for each style x object composition, ways of mixing its two adapters in one denoising run:
  weights (style, object), time splits (one adapter for the first k of 20 steps, then the other or both),
  the mean of both adapters' predictions at every step, each adapter in its own UNet region, and one
  adapter per layer chosen by the size of its weights (K-LoRA).
Writes docs/research/compositions/adapter_mixing.json.
"""
import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

from benchmarks import harness
from benchmarks.continual import Served, score_concepts, teach_as_adapters
from big.generation import sampling
from big.generation.prompting import DEFAULT_EMPHASIS
from shapes_world import evaluate
from shapes_world.scorer import Scorer

STEPS = evaluate.DEFAULT_STEPS


@dataclasses.dataclass(frozen=True)
class PerLayerChoice:
    """One adapter per LoRA layer instead of their sum (K-LoRA, Ouyang et al. 2025): a layer takes the object's
    adapter while the sum of its k largest |delta W| entries, divided by gamma (the object's mean total |delta W|
    over the style's, per layer), exceeds the style's times alpha * progress + beta; so the object holds the
    early steps (the layout) and the style the late ones (the texture) where alpha > 0."""
    k: int = 64
    alpha: float = 1.5
    beta: float = 0.5
# (name, [(from step, {"style"|"object": adapter weight})]): the adapters in use from each step on.
MIXES = [
    ("both x1 (routed)", [(0, {"style": 1.0, "object": 1.0})]),
    ("style x0.5", [(0, {"style": 0.5, "object": 1.0})]),
    ("object x0.5", [(0, {"style": 1.0, "object": 0.5})]),
    ("object, then both from step 5", [(0, {"object": 1.0}), (5, {"style": 1.0, "object": 1.0})]),
    ("object, then style from step 5", [(0, {"object": 1.0}), (5, {"style": 1.0})]),
    ("object, then style from step 10", [(0, {"object": 1.0}), (10, {"style": 1.0})]),
    ("style, then object from step 10", [(0, {"style": 1.0}), (10, {"object": 1.0})]),
    # Each adapter's own noise prediction at every step, averaged ("LoRA Composite", Zhong et al. 2024).
    ("mean of the two predictions", "composite"),
    # Object adapter in the down and mid blocks, style adapter in the up blocks (the B-LoRA idea that a
    # UNet's regions carry content and style).
    ("object down+mid, style up", {"object": ("down_blocks", "mid_block", "conv_in", "time_embedding"),
                                   "style": ("up_blocks", "conv_out")}),
    ("one adapter per layer (K-LoRA)", PerLayerChoice()),
    ("one adapter per layer, by size only", PerLayerChoice(alpha=0.0, beta=1.0)),
]


def adapter_parts(svc, concept):
    """(adapter name, LoRA file, (token id, embedding) or None) of a metamodel concept."""
    name, lora_file, _ = svc.models.adapter_use(concept)
    return name, lora_file, svc.models.concept_embedding(concept, svc.models.concept(concept))


@torch.no_grad()
def mixed_images(svc, parts: dict, prompt: str, schedule, n: int, seed: int):
    """n images of the prompt with the adapters switched as `schedule` says, over the base trunk."""
    runtime = svc.models.trunk_loras("meta", 0)
    with runtime.lock:
        pipe = runtime.activate([(name, path, 1.0) for name, path, _ in parts.values()])

        def use(weights):
            pipe.set_adapters([parts[k][0] for k in weights], adapter_weights=list(weights.values()))

        step_hook = None  # called before each denoising step 1..STEPS-1 by the schedules that change over time
        if schedule == "composite":
            average_predictions(pipe, [parts[k][0] for k in ("style", "object")])
        elif isinstance(schedule, dict):
            scale_by_region(pipe, {parts[k][0]: prefixes for k, prefixes in schedule.items()})
        elif isinstance(schedule, PerLayerChoice):
            choose = per_layer_choice(pipe, parts["style"][0], parts["object"][0], schedule)
            choose(0.0)

            def step_hook(step):
                choose(step / STEPS)
        else:
            use(schedule[0][1])

            def step_hook(step):
                for start, weights in schedule:
                    if step == start:
                        use(weights)

        def on_step_end(_pipe, step, _t, kwargs):
            step_hook(step + 1)
            return kwargs

        embeds = dict(p[2] for p in parts.values() if p[2] is not None)
        e, ne = sampling.encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt] * n, [""] * n, pipe.device,
                                          dtype=pipe.text_encoder.dtype, emphasis=DEFAULT_EMPHASIS, embeddings=embeds)
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        try:
            return pipe(prompt_embeds=e, negative_prompt_embeds=ne, num_inference_steps=STEPS,
                        guidance_scale=evaluate.DEFAULT_GUIDANCE, generator=gens, height=svc.size, width=svc.size,
                        callback_on_step_end=on_step_end if step_hook else None).images
        finally:
            pipe.unet.__dict__.pop("forward", None)  # undo average_predictions; activate() resets scales


def average_predictions(pipe, names):
    """The UNet answers with the mean of its answers under each adapter alone (until the override is removed)."""
    forward = pipe.unet.forward

    def averaged(*args, **kwargs):
        outs = []
        for name in names:
            pipe.set_adapters([name], adapter_weights=[1.0])
            out = forward(*args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out.sample)
        return (sum(outs) / len(outs),)  # the pipeline calls the UNet with return_dict=False

    pipe.unet.forward = averaged


def per_layer_choice(pipe, style: str, obj: str, rule: PerLayerChoice):
    """A function of the denoising progress (0..1) that switches each LoRA layer to one of the two adapters."""
    def delta(module, name):
        return (module.lora_B[name].weight.flatten(1) @ module.lora_A[name].weight.flatten(1)) * module.scaling[name]

    def top_k(d):
        return torch.topk(d.abs().flatten(), min(rule.k, d.numel())).values.sum().item()

    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer) and style in m.lora_A and obj in m.lora_A]
    deltas = [(delta(m, obj), delta(m, style)) for m in layers]
    sizes = [(top_k(d_obj), top_k(d_style)) for d_obj, d_style in deltas]
    gamma = float(np.mean([d_obj.abs().sum().item() / d_style.abs().sum().item() for d_obj, d_style in deltas]))

    def choose(progress: float):
        for m, (s_obj, s_style) in zip(layers, sizes):
            use_obj = s_obj / gamma > s_style * (rule.alpha * progress + rule.beta)
            m.set_scale(obj, float(use_obj))
            m.set_scale(style, float(not use_obj))
    return choose


def scale_by_region(pipe, regions: dict):
    """Each adapter at weight 1 in the UNet modules under its prefixes and 0 elsewhere."""
    for module_name, module in pipe.unet.named_modules():
        if isinstance(module, LoraLayer):
            for adapter, prefixes in regions.items():
                if adapter in module.lora_A:
                    module.set_scale(adapter, 1.0 if module_name.startswith(prefixes) else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/research/compositions")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    scorer, t0, seed, n = Scorer(), time.time(), a.seed, a.n
    report = {"seed": seed, "n": n, "threads": a.threads, "seeds": f"concepts {seed + 7}.., class {seed + 100007}.., "
              f"compositions {seed + 11}.., base {seed}.. (as continual.py)"}
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp)
        learned = teach_as_adapters(svc, seed)
        routed = Served(svc, "bench", "meta", len(learned))
        runtime = svc.models.trunk_loras("meta", 0)
        parts = {c["identifier"]: adapter_parts(svc, c) for *_, c in learned}

        class Merged:  # every adapter on, whatever the prompt names
            def __call__(self, prompts, **kw):
                with runtime.lock:
                    pipe = runtime.activate([(nm, path, 1.0) for nm, path, _ in parts.values()])
                    embeds = dict(p[2] for p in parts.values() if p[2] is not None)
                    e, ne = sampling.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, [""] * len(prompts),
                                                      pipe.device, dtype=pipe.text_encoder.dtype,
                                                      emphasis=DEFAULT_EMPHASIS, embeddings=embeds)
                    return pipe(prompt_embeds=e, negative_prompt_embeds=ne,
                                num_inference_steps=kw["num_inference_steps"], guidance_scale=kw["guidance_scale"],
                                generator=kw["generator"], height=kw["height"], width=kw["width"])

        for label, pipe in (("routed", routed), ("merged", Merged())):
            scores = score_concepts(pipe, scorer, [(name, category, attrs, c["identifier"])
                                                   for name, category, attrs, c in learned], n=n, seed=seed + 7)
            fid = {name: sc["fidelity"] for name, sc in scores.items()}
            leak = {name: sc["prior_leak"] for name, sc in scores.items()}
            base = evaluate.base_accuracy(pipe, scorer, n=64, seed=seed)["seen"]
            report[label] = {"fidelity": fid, "class_leak": leak, "base_both_seen": base["both"]}
            print(label, json.dumps(report[label]), flush=True)

        # What routing costs at generation: one prompt through its adapter vs a plain prompt through the trunk,
        # n images each, alternated and repeated (adapters already loaded by the scoring above).
        ident = learned[0][3]["identifier"]
        times = {"trunk": [], "adapter": []}
        for _ in range(3):
            for kind, prompt in (("trunk", "a red star"), ("adapter", f"a {ident} shape")):
                t = time.perf_counter()
                evaluate.generate(routed, [prompt] * n, seed=seed)
                times[kind].append(time.perf_counter() - t)
        report["generate_s"] = {k: round(min(v), 3) for k, v in times.items()}
        report["adapter_over_trunk"] = round(min(times["adapter"]) / min(times["trunk"]), 3)
        print("generate", report["generate_s"], "adapter/trunk", report["adapter_over_trunk"], flush=True)

        report["compositions"] = {}
        for mix, schedule in MIXES:
            row = {}
            for sname, _, sattrs, sc in [x for x in learned if x[1] == "painting"]:
                for oname, _, oattrs, oc in [x for x in learned if x[1] == "shape"]:
                    both = {**sattrs, **oattrs}
                    imgs = mixed_images(svc, {"style": parts[sc["identifier"]], "object": parts[oc["identifier"]]},
                                        f"a {sc['identifier']} painting of a {oc['identifier']} shape",
                                        schedule, n, seed + 11)
                    reads = scorer.read(imgs)
                    row[f"{sname}x{oname}"] = {
                        "both": float(np.mean([evaluate.shows(rd, both) for rd in reads])),
                        **{k: float(np.mean([rd[k] == v for rd in reads])) for k, v in both.items()}}
            report["compositions"][mix] = row
            print(f"{mix:34s} mean {np.mean([v['both'] for v in row.values()]):.2f}  {json.dumps(row)}", flush=True)
        svc.close()
    report["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(a.out, "adapter_mixing.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
