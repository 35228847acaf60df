"""Service benchmarks on the embedded model, each a ratio against a reference run in this process.

    python -m benchmarks.service_bench [--threads 2] [--steps 60] [--no-grpc]   (--preset smoke: the tests' run)

1. finetune throughput: big.training.loop.dreambooth (VAE latents and text states computed once per
   job) vs the plain diffusers DreamBooth loop (VAE encode + text encoder every step), same model,
   data, batch and steps. Ratio = plain time / ours. Also the milliseconds of each part of a plain step.
2. class images: a second finetune in a known category generates none (counts printed).
3. /generate overhead: BIGService.generate (validation, cache lookup, PNG metadata) vs a bare
   pipeline call with the same prompt, steps and seeds; and the same over gRPC through a real flow.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks import harness
from big.training import loop


def plain_diffusers_loop(pipe, instances, priors, *, steps, batch, lr, seed, size):
    """diffusers' train_dreambooth.py inner loop: encode every step, nothing cached."""
    import copy

    from diffusers import DDPMScheduler

    unet = copy.deepcopy(pipe.unet).train().requires_grad_(True)  # the served UNet is frozen
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    inst_px = torch.stack([loop.preprocess(e.image, size) for e in instances])
    prior_px = torch.stack([loop.preprocess(e.image, size) for e in priors])
    tok = pipe.tokenizer
    for _ in range(steps):
        ii = torch.randint(0, len(instances), (batch,), generator=g)
        pi = torch.randint(0, len(priors), (batch,), generator=g)
        px = torch.cat([inst_px[ii], prior_px[pi]])
        texts = [instances[i].prompt for i in ii.tolist()] + [priors[i].prompt for i in pi.tolist()]
        with torch.no_grad():
            latents = pipe.vae.encode(px).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
            ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            states = pipe.text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g)
        pred = unet(sched.add_noise(latents, noise, t), t, states).sample
        a, b = pred.chunk(2)
        na, nb = noise.chunk(2)
        loss = F.mse_loss(a, na) + F.mse_loss(b, nb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # train_dreambooth.py's max_grad_norm
        opt.step()
        opt.zero_grad()
    return unet


def step_breakdown(pipe, instances, priors, batch, size, repeat=10):
    """Milliseconds of each part of one plain DreamBooth step: what caching and the fused AdamW can save."""
    import copy

    px = torch.stack([loop.preprocess(e.image, size) for e in (instances * batch)[:batch] + priors[:batch]])
    texts = [e.prompt for e in (instances * batch)[:batch] + priors[:batch]]
    tok = pipe.tokenizer
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    unet = copy.deepcopy(pipe.unet).train().requires_grad_(True)
    with torch.no_grad():
        vae_s = timed(lambda: pipe.vae.encode(px).latent_dist.sample(), repeat)
        text_s = timed(lambda: pipe.text_encoder(ids)[0], repeat)
        latents = pipe.vae.encode(px).latent_dist.sample() * pipe.vae.config.scaling_factor
        states = pipe.text_encoder(ids)[0]
    t = torch.randint(0, 1000, (latents.shape[0],), generator=torch.Generator().manual_seed(0))

    def forward_backward():
        F.mse_loss(unet(latents, t, states).sample, latents).backward()

    forward_backward()
    unet_s = timed(forward_backward, repeat)
    out = {"vae_encode": vae_s, "text_encoder": text_s, "unet_forward_backward": unet_s}
    for name, kw in (("adamw_default", {}), ("adamw_fused", {"fused": True})):
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, **kw)
        opt.step()
        out[name] = timed(opt.step, repeat)
    out = {k: round(v * 1000, 1) for k, v in out.items()}
    plain = out["vae_encode"] + out["text_encoder"] + out["unet_forward_backward"] + out["adamw_default"]
    out["frozen_share_of_plain_step"] = round((out["vae_encode"] + out["text_encoder"]) / plain, 3)
    return out


def timed(fn, repeat=1):
    return harness.median_seconds(fn, repeat)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--class-images", type=int, default=32)
    ap.add_argument("--no-grpc", action="store_true")
    ap.add_argument("--out", default="reports/service_bench")
    a = harness.parse_args(ap, argv, smoke=dict(steps=3, batch=2, repeat=1, class_images=4, no_grpc=True))
    imgs = harness.scene_images(5, 0, **harness.HEART_DOT)
    report = {"threads": a.threads, "steps": a.steps, "batch": a.batch, "repeat": a.repeat, "preset": a.preset}
    with tempfile.TemporaryDirectory() as tmp:
        svc = harness.service(tmp)
        pipe = svc.base_pipe
        cache_dir = svc.ws.class_image_dir(svc.base_key, "shape", svc.size)

        # 2. class images, cold then warm cache (also fills the cache for 1.)
        finetune = {"category": "shape", "max_train_steps": 5, "num_class_images": a.class_images}
        svc.finetune("u1", imgs, finetune)
        n_after_first = len([f for f in os.listdir(cache_dir) if f.endswith(".png")])
        t0 = time.perf_counter()
        svc.finetune("u2", imgs, finetune)
        second = time.perf_counter() - t0
        n_after_second = len([f for f in os.listdir(cache_dir) if f.endswith(".png")])
        report["class_images"] = {"generated_by_first_finetune": n_after_first,
                                  "generated_by_second_finetune": n_after_second - n_after_first,
                                  "second_finetune_wall_s": round(second, 2)}

        # 1. training throughput
        instances = [loop.TrainExample(im, "a sks shape") for im in imgs]
        priors = [loop.TrainExample(im, "a shape")
                  for im in svc.ws.load_class_images(svc.base_key, "shape", svc.size, a.class_images)]
        kw = dict(steps=a.steps, batch=a.batch, lr=1e-4, seed=0, size=svc.size)
        plain = timed(lambda: plain_diffusers_loop(pipe, instances, priors, **kw), a.repeat)
        ours = timed(lambda: loop.dreambooth(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            noise_scheduler=svc.models.noise_scheduler(), instances=instances, priors=priors, learning_rate=1e-4,
            max_train_steps=a.steps, train_batch_size=a.batch, seed=0, size=svc.size), a.repeat)
        report["finetune_throughput"] = {"plain_diffusers_s": round(plain, 3), "big_s": round(ours, 3),
                                         "speedup": round(plain / ours, 2)}
        report["plain_step_breakdown_ms"] = step_breakdown(pipe, instances, priors, a.batch, svc.size)

        # 3. generate overhead, in process
        gen_kw = dict(num_inference_steps=20, guidance_scale=4.0, height=32, width=32)
        bare = timed(lambda: pipe(["a red star"] * 4, generator=[torch.Generator().manual_seed(s) for s in range(4)],
                                  **gen_kw), a.repeat * 2)
        svc_t = timed(lambda: svc.generate("u1", ["a red star"], {"num_images": 4, "seed": 0, **gen_kw}), a.repeat * 2)
        report["generate_in_process"] = {"bare_pipeline_s": round(bare, 4), "service_s": round(svc_t, 4),
                                         "overhead": round(svc_t / bare - 1, 3)}
        svc.close()

    if not a.no_grpc:
        report["generate_grpc"] = grpc_overhead(a.repeat * 2, a.threads)
    print(json.dumps(report, indent=1))
    harness.write_report(a.out, "service_bench", report)
    return report


def grpc_overhead(repeat, threads):
    """/generate through a real `jina flow` (a child process, as a user starts it) vs the bare pipeline call.

    The flow's executor gets the same torch thread count (OMP_NUM_THREADS) as the bare call here.
    """
    from docarray import DocList
    from docarray.documents import ImageDoc, TextDoc

    from big.auth import mint_token
    from big.weights.pipelines import load_base_pipeline
    from executor.flow_process import FlowProcess

    secret = "bench-secret-0123456789-abcdefghijkl"
    pipe = load_base_pipeline("embedded", torch.device("cpu"))
    gen_kw = dict(num_inference_steps=20, guidance_scale=4.0, height=32, width=32)
    bare_call = lambda: pipe(["a red star"] * 4, generator=[torch.Generator().manual_seed(s) for s in range(4)],  # noqa: E731
                             **gen_kw)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"BIG_WORKSPACE": os.path.join(tmp, "ws"), "BIG_BASE_MODEL": "embedded", "BIG_AUTH_MODE": "hs256",
               "BIG_JWT_SECRET": secret, "OMP_NUM_THREADS": str(threads), "JINA_LOG_LEVEL": "ERROR"}
        with FlowProcess(tmp, env=env) as flow:
            client = flow.wait_ready()
            params = {"jwt": {"token": mint_token("bench", secret)}, "num_images": 4, "seed": 0, **gen_kw}
            call = lambda: client.post("/generate", inputs=DocList[TextDoc]([TextDoc(text="a red star")]),  # noqa: E731
                                       parameters=params, return_type=DocList[ImageDoc])
            call()
            bare_call()
            # Interleave so that drift in machine load hits both sides alike.
            grpc_times, bare_times = [], []
            for _ in range(repeat):
                grpc_times.append(timed(call))
                bare_times.append(timed(bare_call))
    grpc_t, bare = statistics.median(grpc_times), statistics.median(bare_times)
    return {"bare_pipeline_s": round(bare, 4), "grpc_generate_s": round(grpc_t, 4), "overhead": round(grpc_t / bare - 1, 3)}


if __name__ == "__main__":
    main()
