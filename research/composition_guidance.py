"""Style x object compositions with extra guidance towards the object alone: a composable prompt
(`AND`, Liu et al. 2022, "Compositional Visual Generation with Composable Diffusion Models") through /generate.

    python -m research.composition_guidance [--seeds 11 40] [--n 32] [--object-weights 0 1 2] [--emphasis 1,1 0.6,1.3]
        [--described-weights 1 0.7] [--backgrounds free white] [--teach-seed 0] [--style-hue-copies 3]
        [--style-images 15] [--style-lora-rank 1] [--style-param max_train_steps=300 ...]

Teaches the four concepts of benchmarks/continual.py to one `adapters` metamodel (the service's own path), then
asks the service for

    "a {style} painting of a {object} shape AND a {object} shape :{weight}"

Each AND part is routed to the adapters it names, so the second part is the object's adapter alone; at every
step eps = mean_i uncond_i + guidance * sum_i weight_i (cond_i - uncond_i) (generation.render_composed).
Object weight 0 is the plain prompt, i.e. what /generate does without AND. `--emphasis S,O` also weights the
words themselves ("a (ssh:0.6) painting of a (bnp:1.3) shape", the service's prompt emphasis; 1,1: none).
Guidance 4 (the default), so a weight of 2 adds the object's own guidance at 8. `--described-weights 0.7
--backgrounds white` also asks for the object described in the base model's words in the style's part, with a
named background (described_prompt; "free" names none), as a user who knows the base model's words would:

    "a {style} painting of a orange heart on a white background AND a {object} shape on a white background :0.7"

`--style-hue-copies K` teaches the styles with K hue-rotated copies of each image (`/finetune`'s `hue_copies`);
`--style-images N` teaches each style with N images instead of five (the first five the same);
`--style-lora-rank R` gives the styles' adapters rank R (the objects keep the model's default);
`--style-param KEY=VALUE` passes any other /finetune parameter to the styles only (VALUE read as JSON, else
text; repeatable): `max_train_steps=300`, or `metamodel_strategy=seed_split` to teach the styles into the trunk
by DreamBooth while the objects stay adapters.
Every concept's own fidelity ("a {id} {category}", n images from the first seed) and its class leak are
scored too, as a change to how styles are taught must keep the styles learned.
Images i use seed + i; the scorer reads every attribute of both concepts (`--second-scorer DIR` reads them
again with another scorer, e.g. models/shapes-scorer-inks, whose mark head also reads dots in other inks). Writes
docs/research/compositions/composition_guidance.json and a contact sheet of the first images of each pair and prompt.
"""
import argparse
import json
import tempfile
import time

import numpy as np
import torch

from benchmarks import harness
from benchmarks.continual import SEQUENCE, Served, score_concepts, teach_as_adapters
from benchmarks.harness import write_report
from shapes_world import evaluate
from shapes_world.scorer import Scorer


def emphasised(word: str, weight: float) -> str:
    return word if weight == 1 else f"({word}:{weight:g})"


def composed_prompt(style_word: str, object_word: str, weight: float, emphasis=(1.0, 1.0)) -> str:
    prompt = f"a {emphasised(style_word, emphasis[0])} painting of a {emphasised(object_word, emphasis[1])} shape"
    return f"{prompt} AND a {object_word} shape :{weight:g}" if weight else prompt


def described_prompt(style_word: str, object_word: str, description: str, weight: float,
                     background: str | None = None) -> str:
    """The user describes the object in the base model's words ("orange heart") in the style's part, which is
    then routed to the style's adapter alone, as each adapter composes with base words; the object's part is
    its adapter alone. A named background goes into both parts."""
    where = f" on a {background} background" if background else ""
    return f"a {style_word} painting of a {description}{where} AND a {object_word} shape{where} :{weight:g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 40])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--object-weights", type=float, nargs="+", default=[0.0, 1.0, 2.0],
                    help="the object part's AND weight (times the guidance scale 4)")
    ap.add_argument("--emphasis", type=_weight_pair, nargs="+", default=[(1.0, 1.0)],
                    help="STYLE,OBJECT emphasis weights of the two identifiers in the composition part (1,1: none)")
    ap.add_argument("--described-weights", type=float, nargs="+", default=[],
                    help="also score the described prompt (described_prompt) at these object weights")
    ap.add_argument("--backgrounds", nargs="+", default=["free"], choices=["free", "black", "white", "gray"],
                    help="backgrounds named in the described prompt (free: none named)")
    ap.add_argument("--teach-seed", type=int, default=0, help="seed of the concepts' images and training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-model", default="embedded", help="'embedded' or a model folder (e.g. a variant of it)")
    ap.add_argument("--out", default="docs/research/compositions")
    ap.add_argument("--style-hue-copies", type=int, default=0, help="the styles' hue_copies when taught")
    ap.add_argument("--style-images", type=int, default=5, help="how many images teach each style")
    ap.add_argument("--style-lora-rank", type=int, help="the styles' lora_rank (default: the model's, 4)")
    ap.add_argument("--style-param", action="append", default=[], type=_style_param, metavar="KEY=VALUE",
                    help="another /finetune parameter for the styles only (repeatable)")
    ap.add_argument("--second-scorer", help="a scorer folder that reads every image again (reported beside)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    # hue_copies 0 is /finetune's default, so passing it changes nothing.
    style_params = {"hue_copies": a.style_hue_copies, **({"lora_rank": a.style_lora_rank} if a.style_lora_rank else {}),
                    **dict(a.style_param)}
    t0 = time.time()
    attrs = {name: at for name, _, at in SEQUENCE}
    report = {"base_model": a.base_model, "seeds": a.seeds, "n": a.n, "guidance": evaluate.DEFAULT_GUIDANCE,
              "pairs": {}, "teach_seed": a.teach_seed, "style_hue_copies": a.style_hue_copies,
              "style_images": a.style_images, "style_lora_rank": a.style_lora_rank,
              "style_params": style_params,
              "object_weight_means": "the AND weight of the object part"}
    sheet = []
    with tempfile.TemporaryDirectory() as tmp:
        # Training gains nothing from a second thread on this UNet (benchmarks/continual.py).
        svc = harness.service(tmp, base_model=a.base_model, train_threads=1)
        learned = teach_as_adapters(svc, seed=a.teach_seed, style_images=a.style_images, style_params=style_params)
        concepts = {name: c for name, _, _, c in learned}
        report["train_s"] = round(time.time() - t0, 1)
        served = Served(svc, "bench", "meta", concepts[SEQUENCE[-1][0]]["version"])  # the last concept's version
        scorer = Scorer()
        second = Scorer(a.second_scorer) if a.second_scorer else None
        if second:
            report["second_scorer"] = a.second_scorer
        # Each concept alone, as benchmarks/continual.py scores it.
        scores = score_concepts(served, scorer, [(name, category, at, c["identifier"]) for name, category, at, c
                                                 in learned], n=a.n, seed=a.seeds[0])
        report["concepts"] = {name: {"fidelity": round(sc["fidelity"], 3), "class_leak": round(sc["prior_leak"], 3)}
                              for name, sc in scores.items()}
        print("each concept alone:", json.dumps(report["concepts"]), flush=True)
        for style in ("checker", "hollow"):
            for obj in ("heart-dot", "star-ring"):
                s, o = concepts[style]["identifier"], concepts[obj]["identifier"]
                want = {**attrs[style], **attrs[obj]}
                description = f"{attrs[obj]['colour']} {attrs[obj]['shape']}"
                prompts = {_row_key(w, e): composed_prompt(s, o, w, e) for e in a.emphasis for w in a.object_weights}
                for bg in a.backgrounds:
                    for w in a.described_weights:
                        prompts[f"described {w:g} {bg}"] = described_prompt(s, o, description, w,
                                                                            None if bg == "free" else bg)
                rows = {}
                for key, prompt in prompts.items():
                    per_seed, per_attr, per_seed_2 = [], {k: [] for k in want}, []
                    for seed in a.seeds:
                        images = evaluate.generate(served, [prompt] * a.n, seed=seed)
                        reads = scorer.read(images)
                        per_seed.append(float(np.mean([evaluate.shows(rd, want) for rd in reads])))
                        for k, v in want.items():
                            per_attr[k].append(float(np.mean([rd[k] == v for rd in reads])))
                        if second:
                            per_seed_2.append(float(np.mean([evaluate.shows(rd, want) for rd in second.read(images)])))
                        if seed == a.seeds[0]:
                            sheet += [(im, prompt) for im in images[:4]]
                    row = rows[key] = {
                        "prompt": prompt, "both_right": per_seed, "mean": round(float(np.mean(per_seed)), 3),
                        "attributes": {k: round(float(np.mean(v)), 3) for k, v in per_attr.items()}}
                    if second:
                        row["second_scorer"] = {"both_right": per_seed_2, "mean": round(float(np.mean(per_seed_2)), 3)}
                    print(f"{prompt}: both right {per_seed} {row['attributes']}"
                          + (f" second scorer {per_seed_2}" if second else ""), flush=True)
                report["pairs"][f"{style}x{obj}"] = rows
        svc.close()
    report["wall_s"] = round(time.time() - t0, 1)
    write_report(a.out, "composition_guidance", report, sheet, columns=12,
                 title=f"compositions with an AND part for the object alone (seed {a.seeds[0]}..)")
    print("\nmean over the seeds of the share of images with every attribute right")
    print(f"{'AND weight':24s}" + "  ".join(f"{p:>18s}" for p in report["pairs"]))
    for key in next(iter(report["pairs"].values())):
        print(f"{key:24s}" + "  ".join(f"{report['pairs'][p][key]['mean']:18.2f}" for p in report["pairs"]))
        if a.second_scorer:
            print(f"{'  second scorer':24s}" + "  ".join(
                f"{report['pairs'][p][key]['second_scorer']['mean']:18.2f}" for p in report["pairs"]))
    print(f"wall {report['wall_s']} s (training {report['train_s']} s)")


def _style_param(text: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE read as JSON where it parses ("300", "true", "[1, 2]") and as text otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _weight_pair(text: str) -> tuple[float, float]:
    style, obj = (float(x) for x in text.split(","))
    return style, obj


def _row_key(weight: float, emphasis) -> str:
    """The object weight ("2", as in earlier reports), with the emphasis when there is one ("2 emphasis 0.6,1.3")."""
    return f"{weight:g}" if tuple(emphasis) == (1.0, 1.0) else f"{weight:g} emphasis {emphasis[0]:g},{emphasis[1]:g}"


if __name__ == "__main__":
    main()
