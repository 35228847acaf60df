"""BIG from the command line.

    export BIG_HOST=grpc://localhost:51000 BIG_TOKEN=$(python -m executor.auth mint alice)
    python -m client_examples.cli finetune client_examples/sample_concept --category shape [--target meta]
    python -m client_examples.cli generate "a sks shape" --target private --identifier sks --out out/
    python -m client_examples.cli concepts
    python -m client_examples.cli jobs [JOB_ID] [--cancel]
    python -m client_examples.cli delete sks
`generate` writes one PNG per image (with its parameters inside) and a captioned contact_sheet.png.
"""
from __future__ import annotations

import argparse
import os
import sys

from .big_client import BIGClient, save_images


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
    g = sub.add_parser("generate", help="generate images for prompts")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--target", default="pretrained", choices=["pretrained", "private", "meta", "private_meta"])
    g.add_argument("--identifier")
    g.add_argument("--num-images", type=int, default=4)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--negative")
    g.add_argument("--seed", type=int)
    g.add_argument("--out", default="big_out")
    sub.add_parser("concepts", help="list the concepts you can use")
    j = sub.add_parser("jobs", help="list your jobs, or show/cancel one")
    j.add_argument("job_id", nargs="?")
    j.add_argument("--cancel", action="store_true")
    d = sub.add_parser("delete", help="delete one of your private concepts")
    d.add_argument("identifier")
    a = ap.parse_args(argv)
    if not a.token:
        ap.error("no token: pass --token or set BIG_TOKEN (mint one with `python -m executor.auth mint USER`)")
    big = BIGClient(a.host, a.token)
    if a.cmd == "finetune":
        c = big.finetune(a.folder, a.category, a.target, max_train_steps=a.steps, learning_rate=a.lr,
                         wait=False if a.no_wait else None)
        if c.text:
            print(f'Finetuning was successful. The identifier is "{c.text}": try "{c.prompt}" '
                  f"(target_model={c.target_model}, version {c.model_version})")
        else:
            print(f"queued as job {c.job_id}")
    elif a.cmd == "generate":
        docs = big.generate(a.prompts, a.target, identifier=a.identifier, num_images=a.num_images,
                            num_inference_steps=a.steps, guidance_scale=a.guidance, negative_prompt=a.negative,
                            seed=a.seed)
        paths = save_images(docs, a.out)
        print(f"wrote {len(paths)} images and {os.path.join(a.out, 'contact_sheet.png')}")
    elif a.cmd == "concepts":
        for c in big.concepts():
            print(f"{c.text:8s} {c.category:12s} {c.target_model:13s} v{c.model_version}  {c.prompt!r}")
    elif a.cmd == "jobs":
        for j in big.jobs(a.job_id, a.cancel):
            print(f"{j.text} {j.status:9s} step {j.step}/{j.total_steps} loss {j.loss} eta {j.eta_s}s "
                  f"{j.identifier or ''} {j.error or ''}")
    elif a.cmd == "delete":
        big.delete(a.identifier)
        print(f"deleted {a.identifier}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
