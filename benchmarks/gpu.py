"""GPU figures on full-size Stable Diffusion architectures, each beside the plain diffusers reference in one run.

SD 1.5 (512 px) and SDXL (1024 px) are built at their published sizes with random weights from the configs in
`benchmarks/configs/` (no download). Measured, at the same precision as the reference (fp16 autocast over fp32
trainable weights, fp16 served modules):
- training steps/s and peak GPU memory of BIG's loop (`training.dreambooth`) and of the plain diffusers loop
  (as diffusers' train_dreambooth*.py scripts step: VAE encoding every step), DreamBooth and LoRA, batch 1 and 4,
  gradient checkpointing on and off; textual inversion;
- generation images/s of BIG's `sampling.render` and of a bare pipeline call, 20 and 30 steps, batch 1, 4, 16;
- a LoRA switch: BIG's `LoraRuntime` against diffusers' load + unload.
Every measurement stops the run's clock at `--budget-s`: what does not fit is marked skipped.

    python -m benchmarks.gpu --out reports/gpu            # on a GPU host
    python -m benchmarks.gpu --tiny --out /tmp/gpu-tiny   # tiny configs of the same classes, on any device
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from big.generation import sampling
from big.weights import pipelines
from big.weights.embeddings import ConceptEmbedding
from big.storage.versions import LORA_FILE, LoraWeights, VersionMeta, write_version
from big.weights.lora import LoraRuntime
from big.training import memory
from big.training.loop import LoraSettings, TrainExample, dreambooth
from big.weights.text import TextSide

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-sd",
                         "tokenizer")  # the real CLIP BPE vocabulary, the same ids as SD's tokenizers
PROMPT = "a photo of sks dog"
LEARNING_RATE = {"dreambooth": 5e-6, "lora": 1e-4, "textual_inversion": 5e-4}


class Clock:
    """The run's budget: a measurement starts only while time is left."""

    def __init__(self, budget_s: float):
        self.end = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    """Before and after each measured run on a GPU, its memory back and the peak counter reset. Nothing to do on a
    CPU (the --tiny check), where no memory is measured and a full collection of the test process's heap costs a
    quarter of a second each time."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def build(name: str, device: torch.device, dtype: torch.dtype):
    """A pipeline of the family in `benchmarks/configs/<name>.json`, random weights made on `device`."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        cfg = json.load(f)
    torch.manual_seed(0)
    schedulers = {"DDIMScheduler": DDIMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])) \
            if "text_encoder_2" in cfg else None
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77)
    parts = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                 scheduler=schedulers[cfg["scheduler"]["_class_name"]].from_config(cfg["scheduler"]))
    if text_2 is not None:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_2, tokenizer_2=tokenizer)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.to(device, dtype)
    counts = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in pipe.components.items()
              if isinstance(m, torch.nn.Module)}
    return pipe, cfg, counts


def instance_images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def text_conditioning(pipe, batch: int, size: int, device):
    """(states, added_cond_kwargs) of the prompt, once: the reference scripts precompute them when the text
    encoders are frozen."""
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=batch,
                                                      do_classifier_free_guidance=False)
            time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=embeds.dtype)
            return embeds, {"text_embeds": pooled, "time_ids": time_ids}
        embeds, _ = pipe.encode_prompt(PROMPT, device=device, num_images_per_prompt=batch,
                                       do_classifier_free_guidance=False)
        return embeds, None


def training_cases(method: str, batches=(1, 4)) -> list[tuple[int, bool, bool]]:
    """(batch, gradient checkpointing, 8-bit Adam) of each measured case: each batch with checkpointing off and
    on, and DreamBooth with 8-bit Adam and checkpointing too (diffusers' low-memory recipe) where bitsandbytes
    imports."""
    if method == "textual_inversion":
        return [(b, False, False) for b in batches]
    cases = [(b, ckpt, False) for b in batches for ckpt in (False, True)]
    if method == "dreambooth" and memory.eight_bit_adam_available():
        cases += [(b, True, True) for b in batches]
    return cases


def reference_training(pipe, method: str, batch: int, checkpointing: bool, steps: int, warmup: int, size: int,
                       device, mixed_precision: str, eight_bit: bool = False) -> dict:
    """The plain diffusers loop: DreamBooth trains an fp32 UNet; LoRA trains fp32 adapters on the served UNet
    (as train_dreambooth_lora*.py do); the VAE encodes the instance images every step."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type != "cuda")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if method == "lora":
        unet = copy.deepcopy(pipe.unet)
        unet.add_adapter(LoraSettings().config(LoraSettings().unet_targets))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet = copy.deepcopy(pipe.unet).float().requires_grad_(True)
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = memory.adamw(params, lr=LEARNING_RATE[method], weight_decay=1e-2, eight_bit=eight_bit, fused=False)
    unet, opt = accelerator.prepare(unet, opt)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for im in instance_images(batch, size)]).to(device, pipe.vae.dtype)
    states, added = text_conditioning(pipe, batch, size, device)
    vae_scale = pipe.vae.config.scaling_factor
    marks = []
    for _ in range(warmup + steps):
        with torch.no_grad():
            vae_in = pixels.float() if pipe.vae.dtype == torch.float32 else pixels
            latents = pipe.vae.encode(vae_in).latent_dist.sample() * vae_scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with accelerator.accumulate(unet), accelerator.autocast():
            pred = unet(noisy, t, states, added_cond_kwargs=added).sample
            loss = F.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss.item()  # the scripts log it each step: one sync per step, as BIG's loop has
        marks.append(time.perf_counter())
    del unet, opt, accelerator
    return {"steps_per_s": round(steps / (marks[-1] - marks[warmup - 1]), 3)}


def big_training(pipe, method: str, batch: int, checkpointing: bool, steps: int, warmup: int, size: int, device,
                 mixed_precision: str, eight_bit: bool = False) -> dict:
    from diffusers import DDPMScheduler

    marks = []
    kw = {}
    if method == "lora":
        kw["lora"] = LoraSettings()
    if method == "textual_inversion":
        token = pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]
        starts = [e.get_input_embeddings().weight[token].detach().float().unsqueeze(0)
                  for e in TextSide.of(pipe).encoders]
        kw.update(train_unet=False, embedding=ConceptEmbedding("sks", token, *starts))
    dreambooth(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
               text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
               noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
               instances=[TrainExample(im, PROMPT) for im in instance_images(4, size)], priors=[],
               learning_rate=LEARNING_RATE[method], max_train_steps=warmup + steps, train_batch_size=batch,
               size=size, progress=lambda step, loss: marks.append(time.perf_counter()),
               gradient_checkpointing=checkpointing, eight_bit_adam=eight_bit, mixed_precision=mixed_precision, **kw)
    return {"steps_per_s": round(steps / (marks[-1] - marks[warmup - 1]), 3)}


def reference_textual_inversion(pipe, batch: int, steps: int, warmup: int, size: int, device,
                                mixed_precision: str) -> dict:
    """diffusers' textual_inversion.py: an fp32 text encoder whose token table alone trains (other rows put
    back after each step), the served UNet and VAE frozen."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type != "cuda")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    text = copy.deepcopy(pipe.text_encoder).float().train()
    table = text.get_input_embeddings().weight
    table.requires_grad_(True)
    original = table.detach().clone()
    token = pipe.tokenizer("sks", add_special_tokens=False).input_ids[0]
    keep = torch.ones(table.shape[0], dtype=torch.bool, device=device)
    keep[token] = False
    opt = torch.optim.AdamW([table], lr=LEARNING_RATE["textual_inversion"], weight_decay=1e-2)
    text, opt = accelerator.prepare(text, opt)
    ids = pipe.tokenizer([PROMPT] * batch, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for im in instance_images(batch, size)]).to(device, pipe.vae.dtype)
    marks = []
    for _ in range(warmup + steps):
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with accelerator.autocast():
            states = text(ids)[0].to(pipe.unet.dtype)
            pred = pipe.unet(noisy, t, states).sample
            loss = F.mse_loss(pred.float(), noise.float())
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            accelerator.unwrap_model(text).get_input_embeddings().weight[keep] = original[keep]
        loss.item()
        marks.append(time.perf_counter())
    del text, opt, accelerator
    return {"steps_per_s": round(steps / (marks[-1] - marks[warmup - 1]), 3)}


def measured(fn, device, *args, **kw) -> dict:
    """fn's figures plus the peak memory it added over what was resident, or the error it stopped with."""
    free(device)
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    try:
        out = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - an out-of-memory or unsupported case is a row, not the end of the run
        out = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    if device.type == "cuda":
        out["peak_gib"] = gib(torch.cuda.max_memory_allocated())
        out["job_gib"] = gib(torch.cuda.max_memory_allocated() - before)
    free(device)
    return out


def time_call(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation_rows(pipe, family: str, size: int, device, steps_list, batches, repeats, clock) -> list[dict]:
    rows = []
    served = pipelines.compose(pipe)

    def bare(b, s):
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        pipe(prompt=[PROMPT] * b, num_inference_steps=s, guidance_scale=7.5, height=size, width=size, generator=gens)

    def big(b, s):
        specs = [sampling.ImageSpec(PROMPT, i, 7.5, s) for i in range(b)]
        sampling.render(served, specs, negative_prompt=None, height=size, width=size, model_label="bench",
                          model_version=0, max_batch=16)

    for _ in range(3):  # warm-up: kernels, attention backends, the GPU's clocks
        bare(4, 10)
        big(4, 10)
    for s in steps_list:
        for b in batches:
            if clock.left() < 0:
                rows.append({"family": family, "steps": s, "batch": b, "skipped": "budget"})
                continue
            row = {"family": family, "steps": s, "batch": b}
            row["bare_images_per_s"] = round(b / time_call(lambda: bare(b, s), device, repeats), 3)
            row["big_images_per_s"] = round(b / time_call(lambda: big(b, s), device, repeats), 3)
            row["big_over_bare"] = round(row["big_images_per_s"] / row["bare_images_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def lora_switch(pipe, device, workdir: str, switches: int) -> dict:
    """Two LoRA files on disk; BIG's runtime switching between them (after the first loads) against diffusers'
    load_lora_weights + unload_lora_weights for each switch."""
    from peft.utils import get_peft_model_state_dict

    folders = []
    for k in range(2):
        unet = copy.deepcopy(pipe.unet)
        torch.manual_seed(k)
        unet.add_adapter(LoraSettings().config(LoraSettings().unet_targets))
        folder = os.path.join(workdir, f"lora{k}")
        write_version(folder, VersionMeta("private", "bench", 1, f"lora{k}", "dog", method="lora"),
                      lora=LoraWeights(get_peft_model_state_dict(unet), None, {"unet": unet.peft_config["default"].to_dict()}))
        folders.append(folder)
        del unet
    runtime = LoraRuntime(pipe)
    files = [os.path.join(f, LORA_FILE) for f in folders]
    first = time_call(lambda: runtime.activate([("a", files[0], 1.0)]), device, 1)
    runtime.activate([("b", files[1], 1.0)])
    flips = [time_call(lambda k=k: runtime.activate([("ab"[k % 2], files[k % 2], 1.0)]), device, 1)
             for k in range(switches)]
    ref_pipe = pipelines.compose(pipe, unet=copy.deepcopy(pipe.unet), text_encoder=copy.deepcopy(pipe.text_encoder))

    def diffusers_switch(k):
        ref_pipe.load_lora_weights(folders[k % 2], weight_name=LORA_FILE)
        ref_pipe.unload_lora_weights()

    ref = [time_call(lambda k=k: diffusers_switch(k), device, 1) for k in range(switches)]
    return {"big_first_load_ms": round(first * 1e3, 1), "big_switch_ms": round(statistics.median(flips) * 1e3, 2),
            "diffusers_load_unload_ms": round(statistics.median(ref) * 1e3, 1)}


def environment(device) -> dict:
    import diffusers
    import transformers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": str(device),
           "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = gib(torch.cuda.get_device_properties(0).total_memory)
    return env


def markdown(report: dict) -> str:
    lines = [f"Environment: `{json.dumps(report['environment'])}`", "",
             "| family | method | batch | grad. ckpt | optimizer | BIG steps/s | reference steps/s | BIG / reference | "
             "BIG peak GiB | reference peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["training"]:
        big, ref = r.get("big", {}), r.get("reference", {})
        ratio = round(big["steps_per_s"] / ref["steps_per_s"], 2) if "steps_per_s" in big and "steps_per_s" in \
            ref else ""
        cell = lambda d: d.get("steps_per_s", d.get("error", d.get("skipped", "")))  # noqa: E731
        lines.append(f"| {r['family']} | {r['method']} | {r['batch']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r.get('optimizer', 'adamw')} | {cell(big)} | {cell(ref)} | {ratio} | {big.get('peak_gib', '')} | {ref.get('peak_gib', '')} |")
    lines += ["", "| family | steps | batch | BIG images/s | bare pipeline images/s | BIG / bare |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in report["generation"]:
        lines.append(f"| {r['family']} | {r['steps']} | {r['batch']} | "
                     f"{r.get('big_images_per_s', r.get('big', r.get('skipped', '')))} | "
                     f"{r.get('bare_images_per_s', '')} | {r.get('big_over_bare', '')} |")
    if report.get("lora_switch"):
        lines += ["", f"LoRA switch (sd15): `{json.dumps(report['lora_switch'])}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (any device)")
    ap.add_argument("--out", default="reports/gpu")
    ap.add_argument("--budget-s", type=float, default=280.0, help="no measurement starts after this")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per case")
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--batches", default="1,4", help="training batch sizes")
    ap.add_argument("--parts", default="training,generation,lora_switch")
    ap.add_argument("--repeats", type=int, default=1, help="generation calls timed per case (the median)")
    ap.add_argument("--save-pipeline", metavar="DIR",
                    help="only write the first family's random-weight pipeline to DIR (a base_model for the service)")
    args = ap.parse_args(argv)
    clock = Clock(args.budget_s)
    device = pipelines.pick_device("auto")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mixed = "fp16" if device.type == "cuda" else "no"
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    steps = args.steps or (2 if args.tiny else 6)
    warmup = 1 if args.tiny else 2
    gen_steps, gen_batches = ((2, 3), (1, 4)) if args.tiny else ((20, 30), (1, 4, 16))
    if args.save_pipeline:
        name = args.families.split(",")[0] + ("-tiny" if args.tiny else "")
        build(name, device, dtype)[0].save_pretrained(args.save_pipeline, safe_serialization=True)
        return {"saved": args.save_pipeline}
    report = {"environment": environment(device), "tiny": args.tiny, "training": [], "generation": [],
              "parameters_millions": {}}
    os.makedirs(args.out, exist_ok=True)
    for family in args.families.split(","):
        name = f"{family}-tiny" if args.tiny else family
        pipe, cfg, counts = build(name, device, dtype)
        report["parameters_millions"][family] = counts
        size = cfg["resolution"]
        print(f"{family}: {counts}", flush=True)
        methods = ["dreambooth", "lora"] + (["textual_inversion"] if family == "sd15" else [])
        for method in methods if "training" in args.parts else ():
            for batch, ckpt, eight_bit in training_cases(method, [int(b) for b in args.batches.split(",")]):
                row = {"family": family, "method": method, "batch": batch, "checkpointing": ckpt,
                       "optimizer": "adamw8bit" if eight_bit else "adamw"}
                if clock.left() < 0:
                    row["big"] = row["reference"] = {"skipped": "budget"}
                else:
                    common = (batch, steps, warmup, size, device, mixed)
                    if method == "textual_inversion":
                        row["reference"] = measured(reference_textual_inversion, device, pipe, *common)
                    else:
                        row["reference"] = measured(reference_training, device, pipe, method, batch, ckpt,
                                                    *common[1:], eight_bit=eight_bit)
                    row["big"] = measured(big_training, device, pipe, method, batch, ckpt, *common[1:],
                                          eight_bit=eight_bit)
                report["training"].append(row)
                print(json.dumps(row), flush=True)
        if "generation" in args.parts:
            report["generation"] += generation_rows(pipe, family, size, device, gen_steps, gen_batches, args.repeats,
                                                    clock)
        if family == "sd15" and "lora_switch" in args.parts and clock.left() > 0:
            report["lora_switch"] = lora_switch(pipe, device, tempfile.mkdtemp(), 3 if args.tiny else 6)
            print(json.dumps(report["lora_switch"]), flush=True)
        del pipe
        free(device)
    report["seconds"] = round(args.budget_s - clock.left(), 1)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
