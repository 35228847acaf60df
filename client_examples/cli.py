"""BIG from the command line.

    export BIG_HOST=grpc://localhost:51000 BIG_TOKEN=$(python -m big.auth mint alice)
    python -m client_examples.cli finetune client_examples/sample_concept --category shape [--target meta]
    python -m client_examples.cli generate "a sks shape" --target private --identifier sks --out out/
    python -m client_examples.cli sweep "a red star" --start 0 --stop 30 --num 31 --seed 7 --out sweep/
    python -m client_examples.cli grid "a red star" "a blue heart" --guidance-scales 2 4 8 --num-seeds 4 --out grid/
    python -m client_examples.cli concepts
    python -m client_examples.cli jobs [JOB_ID] [--cancel]
    python -m client_examples.cli delete sks
    python -m client_examples.cli finetune photos/ --category dog --method textual_inversion --num-vectors 4
    python -m client_examples.cli export sks --out concept/      # pytorch_lora_weights.safetensors, ...
    python -m client_examples.cli import concept/*.safetensors --category dog
`generate` writes one PNG per image (with its parameters inside) and a captioned contact_sheet.png;
`sweep` also writes the server's sweep.gif, `grid` the server's grid.png. `finetune` sends an image's
sidecar .txt (same name) as its caption.
"""
from __future__ import annotations

import argparse
import os
import sys

from .big_client import BIGClient, save_images


def seconds_line(job) -> str:
    """Where an ended job's seconds went, as one line: "took 61.2 s: queue 0.3, load 1.2, class_images 4.0, ..."."""
    seconds = getattr(job, "seconds", None)  # None from a server (or documents) from before jobs recorded them
    if seconds is None or seconds.total is None:
        return "took ? s (not recorded)"
    stages = {k: v for k, v in seconds.dict().items() if k not in ("id", "total") and v is not None}
    return f"took {seconds.total:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())


def _generation_parser(sub, name: str, help_text: str, n_prompts):
    """The options /generate, /sweep and /grid share."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("prompts", nargs=n_prompts)
    p.add_argument("--target", default="pretrained", choices=["pretrained", "private", "meta", "private_meta"])
    p.add_argument("--identifier")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--negative")
    p.add_argument("--scheduler")
    p.add_argument("--emphasis", choices=["context", "original", "none"])
    p.add_argument("--seed", type=int)
    p.add_argument("--out", default="big_out")
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=os.environ.get("BIG_HOST", "grpc://localhost:51000"))
    ap.add_argument("--token", default=os.environ.get("BIG_TOKEN"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("finetune", help="teach a concept from a folder of images")
    f.add_argument("folder")
    f.add_argument("--category", required=True)
    f.add_argument("--target", default="private", choices=["private", "meta", "private_meta"])
    f.add_argument("--steps", type=int)
    f.add_argument("--lr", type=float)
    f.add_argument("--no-wait", action="store_true", help="return a job id at once")
    f.add_argument("--idempotency-key", help="run the command again with the same key to get its first run's job, "
                                             "not a second concept (default: a new one each run)")
    f.add_argument("--method", choices=["dreambooth", "lora", "textual_inversion"])
    f.add_argument("--strategy", choices=["adapters", "seed_split", "naive", "anchored", "replay", "balanced"],
                   help="how a metamodel (meta, private_meta) keeps earlier concepts (default: adapters)")
    f.add_argument("--lora-rank", type=int)
    f.add_argument("--lr-scheduler", choices=["constant", "constant_with_warmup", "linear", "cosine"])
    f.add_argument("--lr-warmup-steps", type=int)
    f.add_argument("--snr-gamma", type=float, help="Min-SNR loss weighting (5 is the usual value)")
    f.add_argument("--num-vectors", type=int)
    f.add_argument("--init-text")
    f.add_argument("--overwrite", help="textual inversion: retrain this existing word")
    f.add_argument("--crop", choices=["center", "focal"])
    f.add_argument("--flip", action="store_true", help="also teach mirrored copies")
    f.add_argument("--hue-copies", type=int, help="also teach this many hue-rotated copies (a style that should "
                                                  "not bind its images' colours)")
    f.add_argument("--split-oversized", action="store_true", help="cut wide/tall images into overlapping tiles")
    f.add_argument("--template", action="append", help='prompt template, e.g. "a painting of [filewords] by [name]"')
    f.add_argument("--captions-from", default="sidecar", choices=["sidecar", "filename", "none"])
    g = _generation_parser(sub, "generate", "generate images for prompts", "+")
    g.add_argument("--num-images", type=int, default=4)
    for name, help_text in (("sweep", "one prompt and seed, one parameter over a range: frames + sweep.gif"),
                            ("grid", "prompts x guidance scales x steps x seeds: images + grid.png")):
        w = _generation_parser(sub, name, help_text, "+" if name == "grid" else 1)
        if name == "sweep":
            w.add_argument("--param", default="guidance_scale", choices=["guidance_scale", "num_inference_steps"])
            w.add_argument("--values", type=float, nargs="+")
            w.add_argument("--start", type=float)
            w.add_argument("--stop", type=float)
            w.add_argument("--num", type=int)
        else:
            w.add_argument("--guidance-scales", type=float, nargs="+")
            w.add_argument("--steps-list", type=int, nargs="+")
            w.add_argument("--num-seeds", type=int)
            w.add_argument("--random-samples", type=int)
            w.add_argument("--split", type=int, default=1, help="concurrent requests (for a flow with replicas)")
    sub.add_parser("concepts", help="list the concepts you can use")
    j = sub.add_parser("jobs", help="list your jobs, or show/cancel one")
    j.add_argument("job_id", nargs="?")
    j.add_argument("--cancel", action="store_true")
    d = sub.add_parser("delete", help="delete one of your private concepts")
    d.add_argument("identifier")
    x = sub.add_parser("export", help="write a private concept's files (LoRA, embeddings)")
    x.add_argument("identifier")
    x.add_argument("--format", default="all", choices=["all", "diffusers", "a1111"])
    x.add_argument("--out", default="big_concept")
    m = sub.add_parser("import", help="a LoRA and/or embedding file as a new private concept")
    m.add_argument("files", nargs="+")
    m.add_argument("--category", required=True)
    m.add_argument("--identifier")
    a = ap.parse_args(argv)
    if not a.token:
        ap.error("no token: pass --token or set BIG_TOKEN (mint one with `python -m big.auth mint USER`)")
    big = BIGClient(a.host, a.token)
    if a.cmd == "finetune":
        c = big.finetune(a.folder, a.category, a.target, captions_from=a.captions_from,
                         idempotency_key=a.idempotency_key, max_train_steps=a.steps,
                         learning_rate=a.lr, wait=False if a.no_wait else None, method=a.method,
                         metamodel_strategy=a.strategy,
                         lora_rank=a.lora_rank, lr_scheduler=a.lr_scheduler, lr_warmup_steps=a.lr_warmup_steps,
                         snr_gamma=a.snr_gamma, num_vectors=a.num_vectors, init_text=a.init_text,
                         overwrite=a.overwrite, crop=a.crop, flip=a.flip or None, hue_copies=a.hue_copies,
                         split_oversized=a.split_oversized or None, prompt_template=a.template)
        if c.text:
            print(f'Finetuning was successful. The identifier is "{c.text}": try "{c.prompt}" '
                  f"(target_model={c.target_model}, version {c.model_version})")
            print(seconds_line(big.jobs(c.job_id)[0]))
        else:
            print(f"queued as job {c.job_id}")
    elif a.cmd == "generate":
        docs = big.generate(a.prompts, a.target, identifier=a.identifier, num_images=a.num_images,
                            num_inference_steps=a.steps, guidance_scale=a.guidance, negative_prompt=a.negative,
                            scheduler=a.scheduler, emphasis=a.emphasis, seed=a.seed)
        paths = save_images(docs, a.out)
        print(f"wrote {len(paths)} images and {os.path.join(a.out, 'contact_sheet.png')}")
    elif a.cmd in ("sweep", "grid"):
        common = dict(identifier=a.identifier, num_inference_steps=a.steps, guidance_scale=a.guidance,
                      negative_prompt=a.negative, scheduler=a.scheduler, emphasis=a.emphasis, seed=a.seed)
        if a.cmd == "sweep":
            docs = big.sweep(a.prompts[0], a.param, a.target, values=a.values, start=a.start, stop=a.stop,
                             num=a.num, **common)
        else:
            docs = big.grid(a.prompts, a.target, split=a.split, guidance_scales=a.guidance_scales,
                            steps=a.steps_list, num_seeds=a.num_seeds, random_samples=a.random_samples, **common)
        paths = save_images(docs, a.out)
        print(f"wrote {len(paths)} files to {a.out} ({'sweep.gif' if a.cmd == 'sweep' else 'grid.png'} included)")
    elif a.cmd == "concepts":
        for c in big.concepts():
            print(f"{c.text:8s} {c.category:12s} {c.target_model:13s} v{c.model_version}  {c.prompt!r}")
    elif a.cmd == "jobs":
        for j in big.jobs(a.job_id, a.cancel):
            print(f"{j.text} {j.status:9s} step {j.step}/{j.total_steps} loss {j.loss} eta {j.eta_s}s "
                  f"{j.identifier or ''} {j.error or ''}")
            if getattr(j, "seconds", None):
                print(f"    {seconds_line(j)}")
    elif a.cmd == "delete":
        big.delete(a.identifier)
        print(f"deleted {a.identifier}")
    elif a.cmd == "export":
        docs = big.export(a.identifier, a.out, a.format)
        for d in docs:
            print(f"{os.path.join(a.out, os.path.basename(d.text))}  {len(d.bytes_)} bytes  sha256 {d.sha256}")
    elif a.cmd == "import":
        c = big.import_files(a.files, a.category, a.identifier)
        print(f'imported as "{c.text}" ({c.method}): try "{c.prompt}" with --target private')
    return 0


if __name__ == "__main__":
    sys.exit(main())
