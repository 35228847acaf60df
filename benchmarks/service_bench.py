"""Service benchmarks on the embedded model, each a ratio against a reference run in this process.

    python benchmarks/service_bench.py [--threads 2] [--steps 60]

1. finetune throughput: executor.training.dreambooth (VAE latents and text states computed once per
   job) vs the plain diffusers DreamBooth loop (VAE encode + text encoder every step), same model,
   data, batch and steps. Ratio = plain time / ours.
2. class images: a second finetune in a known category generates none (counts printed).
3. /generate overhead: BIGService.generate (validation, cache lookup, PNG metadata) vs a bare
   pipeline call with the same prompt, steps and seeds; and the same over gRPC through a real flow.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from executor import training  # noqa: E402
from executor.service import BIGService, ServiceConfig  # noqa: E402
from shapes_world import world  # noqa: E402


def plain_diffusers_loop(pipe, instances, priors, *, steps, batch, lr, seed, size):
    """diffusers' train_dreambooth.py inner loop: encode every step, nothing cached."""
    import copy

    from diffusers import DDPMScheduler

    unet = copy.deepcopy(pipe.unet).train()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    inst_px = torch.stack([training.preprocess(e.image, size) for e in instances])
    prior_px = torch.stack([training.preprocess(e.image, size) for e in priors])
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
        opt.step()
        opt.zero_grad()
    return unet


def timed(fn, repeat=1):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-grpc", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(0)
    imgs = [world.render(world.random_scene(rng, shape="heart", colour="orange", mark="dot")) for _ in range(5)]
    report = {"threads": a.threads, "steps": a.steps, "batch": a.batch, "repeat": a.repeat}
    with tempfile.TemporaryDirectory() as tmp:
        svc = BIGService(ServiceConfig(workspace=tmp, base_model="embedded", auth={"mode": "disabled"}))
        pipe = svc.base_pipe
        cache_dir = svc.ws.class_image_dir(svc.base_key, "shape", svc.size)

        # 2. class images, cold then warm cache (also fills the cache for 1.)
        r1 = svc.finetune("u1", imgs, {"category": "shape", "max_train_steps": 5, "num_class_images": 32})
        n_after_first = len([f for f in os.listdir(cache_dir) if f.endswith(".png")])
        t0 = time.perf_counter()
        svc.finetune("u2", imgs, {"category": "shape", "max_train_steps": 5, "num_class_images": 32})
        second = time.perf_counter() - t0
        n_after_second = len([f for f in os.listdir(cache_dir) if f.endswith(".png")])
        report["class_images"] = {"generated_by_first_finetune": n_after_first,
                                  "generated_by_second_finetune": n_after_second - n_after_first,
                                  "second_finetune_wall_s": round(second, 2)}

        # 1. training throughput
        instances = [training.TrainExample(im, "a sks shape") for im in imgs]
        priors = [training.TrainExample(im, "a shape") for im in svc.ws.load_class_images(svc.base_key, "shape", svc.size, 32)]
        kw = dict(steps=a.steps, batch=a.batch, lr=1e-4, seed=0, size=svc.size)
        plain = timed(lambda: plain_diffusers_loop(pipe, instances, priors, **kw), a.repeat)
        ours = timed(lambda: training.dreambooth(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            noise_scheduler=svc._noise_scheduler(), instances=instances, priors=priors, learning_rate=1e-4,
            max_train_steps=a.steps, train_batch_size=a.batch, seed=0, size=svc.size), a.repeat)
        report["finetune_throughput"] = {"plain_diffusers_s": round(plain, 3), "big_s": round(ours, 3),
                                         "speedup": round(plain / ours, 2)}

        # 3. generate overhead, in process
        gen_kw = dict(num_inference_steps=20, guidance_scale=4.0, height=32, width=32)
        bare = timed(lambda: pipe(["a red star"] * 4, generator=[torch.Generator().manual_seed(s) for s in range(4)],
                                  **gen_kw), a.repeat * 2)
        svc_t = timed(lambda: svc.generate("u1", ["a red star"], {"num_images": 4, "seed": 0, **gen_kw}), a.repeat * 2)
        report["generate_in_process"] = {"bare_pipeline_s": round(bare, 4), "service_s": round(svc_t, 4),
                                         "overhead": round(svc_t / bare - 1, 3)}
        svc.close()

    if not a.no_grpc:
        report["generate_grpc"] = grpc_overhead(a.repeat * 2)
    print(json.dumps(report, indent=1))
    os.makedirs("reports", exist_ok=True)
    with open("reports/service_bench.json", "w") as f:
        json.dump(report, f, indent=1)


def grpc_overhead(repeat):
    """/generate through a real Flow vs the bare pipeline call, same process machine."""
    import socket

    from docarray import DocList
    from docarray.documents import ImageDoc, TextDoc
    from jina import Flow

    from executor.auth import mint_token
    from executor.pipelines import load_base_pipeline

    secret = "bench-secret-0123456789-abcdefghijkl"
    os.environ["BIG_JWT_SECRET"] = secret
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pipe = load_base_pipeline("embedded", torch.device("cpu"))
    gen_kw = dict(num_inference_steps=20, guidance_scale=4.0, height=32, width=32)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BIG_WORKSPACE"] = tmp
        f = Flow(port=port).add(uses=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "config.yml"))
        with f:
            params = {"jwt": {"token": mint_token("bench", secret)}, "num_images": 4, "seed": 0, **gen_kw}
            call = lambda: f.post("/generate", inputs=DocList[TextDoc]([TextDoc(text="a red star")]),  # noqa: E731
                                  parameters=params, return_type=DocList[ImageDoc])
            call()
            grpc_t = timed(call, repeat)
            bare = timed(lambda: pipe(["a red star"] * 4, generator=[torch.Generator().manual_seed(s) for s in range(4)],
                                      **gen_kw), repeat)
    return {"bare_pipeline_s": round(bare, 4), "grpc_generate_s": round(grpc_t, 4), "overhead": round(grpc_t / bare - 1, 3)}


if __name__ == "__main__":
    main()
