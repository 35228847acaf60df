"""Can this CPU run the embedded model's UNet faster than the service does (fp32, contiguous, eager)? Each
option against that reference, in the same process and thread count, for the three kinds of work the
continual benchmark spends its time on:

- an `adapters` training step (rank-4 LoRA on every layer kind of the metamodel default over a frozen trunk,
  AdamW on the adapter), batch 8 (4 instance + 4 prior examples, as the service draws them);
- a DreamBooth training step (every UNet weight trained, AdamW), batch 8;
- a generation call (no grad), batch 64 (32 images with classifier-free guidance, as `evaluate.generate`).

Options: `channels_last` (NHWC tensors for oneDNN's convolutions), `bf16 autocast` (training),
`bf16 trunk` (the frozen trunk cast to bfloat16 under fp32 adapters, the usual GPU recipe), `bf16`
(generation in bfloat16) and, with --compile, `torch.compile` (inductor; the time to its first result is
printed apart: it includes the compile, minutes on a cold inductor cache, seconds on a warm one).
bf16 generation is also scored: the base prompts' accuracy read by the shapes scorer (n images, the same
seeds), the whole pipeline in fp32 against bf16, so a speed-up that changes what is served shows as such.

    python -m research.unet_speed_options [--threads 1] [--repeats 3] [--compile] [--n 64]

Timings alternate the options within each repeat and report medians; writes docs/research/unet_speed_options.json.
"""
import argparse
import contextlib
import json
import os
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from big.config import EMBEDDED_MODEL_DIR
from big.training import loop
from shapes_world import evaluate
from shapes_world.model import TEXT_MAX_LENGTH
from shapes_world.scorer import Scorer

MODEL = EMBEDDED_MODEL_DIR
REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "research", "unet_speed_options.json")


def load_unet(*, lora: bool, dtype=torch.float32, channels_last=False):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(MODEL, "unet"), torch_dtype=dtype)
    if lora:
        unet.requires_grad_(False)
        torch.manual_seed(0)  # the same adapter in every option
        unet.add_adapter(loop.LoraSettings(targets="all").config(loop.LORA_TARGETS["all"]))
        for p in unet.parameters():
            if p.requires_grad:  # the adapter trains in fp32 whatever the trunk's dtype
                p.data = p.data.float()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def inputs(unet, batch: int, dtype, channels_last: bool):
    """Seeded latents, timesteps and text states of the shapes the service feeds `unet`."""
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), generator=g)
    states = torch.randn(batch, TEXT_MAX_LENGTH, cfg.cross_attention_dim, generator=g).to(dtype)
    return x, t, states


def training_step(unet, *, dtype=torch.float32, channels_last=False, autocast=False):
    """A closure running one step (forward, MSE to a fixed target, backward, AdamW) and returning its loss."""
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, states = inputs(unet, 8, dtype, channels_last)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step():
        with ctx():
            pred = unet(x, t, states).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def generation_call(unet, *, dtype=torch.float32, channels_last=False):
    """A closure running one no-grad UNet call and returning its noise prediction in fp32."""
    unet.eval()
    x, t, states = inputs(unet, 64, dtype, channels_last)
    t = torch.full_like(t, 500)

    def call():
        with torch.inference_mode():
            return unet(x, t, states).sample.float()
    return call


def time_options(options: dict, *, repeats: int, iters: int, warmup: int = 2) -> dict:
    """Median seconds per call of each option; the options alternate within each repeat."""
    for fn in options.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in options}
    for _ in range(repeats):
        for name, fn in options.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in samples.items()}


def adapter_step_options() -> dict:
    """The adapters training step under each option (the same adapter, inputs and target), by name."""
    return {
        "fp32 (reference)": training_step(load_unet(lora=True)),
        "channels_last": training_step(load_unet(lora=True, channels_last=True), channels_last=True),
        "bf16 autocast": training_step(load_unet(lora=True), autocast=True),
        "bf16 trunk": training_step(load_unet(lora=True, dtype=torch.bfloat16), dtype=torch.bfloat16),
    }


def generation_options() -> dict:
    """The generation call under each option (the same inputs), by name."""
    return {
        "fp32 (reference)": generation_call(load_unet(lora=False)),
        "channels_last": generation_call(load_unet(lora=False, channels_last=True), channels_last=True),
        "bf16": generation_call(load_unet(lora=False, dtype=torch.bfloat16), dtype=torch.bfloat16),
    }


def compiled(fn_factory, unet, **kw):
    """`fn_factory` over torch.compile(unet), with the first call (the compile) timed apart."""
    c = torch.compile(unet)
    fn = fn_factory(c, **kw)
    t0 = time.perf_counter()
    fn()
    return fn, time.perf_counter() - t0


def base_accuracy_in(dtype, *, n: int, seed: int, scorer) -> dict:
    """The base prompts' accuracy with the whole pipeline in `dtype`, as a service serving in it would run."""
    pipe = evaluate.load_pipeline(MODEL).to(dtype=dtype)
    return evaluate.base_accuracy(pipe, scorer, n=n, seed=seed, parts=("seen",))["seen"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10, help="calls per timing")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    ap.add_argument("--n", type=int, default=64, help="base prompts scored per dtype (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=REPORT)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, seed {a.seed}", flush=True)

    kinds = {"adapters training step": adapter_step_options()}
    kinds["DreamBooth training step"] = {
        "fp32 (reference)": training_step(load_unet(lora=False)),
        "channels_last": training_step(load_unet(lora=False, channels_last=True), channels_last=True),
        "bf16 autocast": training_step(load_unet(lora=False), autocast=True),
    }
    kinds["generation call"] = generation_options()
    compile_s = {}
    if a.compile:
        fn, compile_s["adapters training step"] = compiled(training_step, load_unet(lora=True))
        kinds["adapters training step"]["torch.compile"] = fn
        fn, compile_s["DreamBooth training step"] = compiled(training_step, load_unet(lora=False))
        kinds["DreamBooth training step"]["torch.compile"] = fn
        fn, compile_s["generation call"] = compiled(generation_call, load_unet(lora=False))
        kinds["generation call"]["torch.compile"] = fn

    report = {"seed": a.seed, "threads": a.threads, "repeats": a.repeats, "iters": a.iters, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kinds": {}, "compile_s": compile_s}
    for kind, options in kinds.items():
        secs = time_options(options, repeats=a.repeats, iters=a.iters)
        ref = secs["fp32 (reference)"]
        report["kinds"][kind] = {k: {"ms": round(1000 * s, 1), "speedup": round(ref / s, 2)} for k, s in secs.items()}
        print(kind, flush=True)
        for k, s in secs.items():
            print(f"  {k:18s} {1000 * s:8.1f} ms  {ref / s:5.2f}x", flush=True)
    for kind, s in compile_s.items():
        print(f"torch.compile of the {kind}: {s:.0f} s before its first result", flush=True)

    if a.n:
        scorer = Scorer()
        acc = {name: base_accuracy_in(dt, n=a.n, seed=a.seed, scorer=scorer)
               for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        report["base_accuracy"] = acc
        print(f"base prompts right (both colour and shape, {acc['fp32']['n']} images, seed {a.seed}): "
              f"fp32 {acc['fp32']['both']:.3f}, bf16 {acc['bf16']['both']:.3f}", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
