"""Build the embedded model's offline CLIP tokenizer.

We keep OpenAI CLIP's byte-level BPE *rules* but only the merges needed to spell the shapes world's
words, common category words and a pool of rare identifier words, each as one token. The merge set is
closed (every merge's parts are base bytes or results of kept merges), so any text still tokenizes,
falling back to sub-word pieces exactly like CLIP does for words it has never seen. Ids are compact
(a ~1.5k vocabulary instead of 49,408), which keeps the text encoder's embedding table small.

Build (one-off; the result ships in models/shapes-sd/tokenizer):
    pip download --no-deps open_clip_torch -d /tmp/oc && unzip /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    python -m shapes_world.tokenizer --bpe /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz --out DIR
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import string

from . import world

# Words a user of the embedded model may reasonably use besides the world's own vocabulary.
EXTRA_WORDS = (
    "a an of on in the with and by photo picture image style art object background "
    "dog cat bottle toy car person man woman face chair cup keyboard bag shoe house tree "
    "portrait drawing sketch close up colour color pattern"
).split()

# Identifiers people know from DreamBooth write-ups; kept when CLIP spells them as one token.
CLASSIC_IDENTIFIERS = ("sks", "qzq", "lnl", "rvt", "pyr", "sph", "brc", "btb", "zwx", "olis")

MIN_IDENTIFIERS = 256
IDENTIFIER_POOL_FILE = "rare_identifiers.json"
_VOWELS = set("aeiouy")
# Abbreviations with a meaning nobody wants attached to their dog.
_BLOCKLIST = {"kkk", "nsfw", "fml", "wtf", "wth", "stfu", "lgbt", "smh", "xxx", "xxxx", "bbw", "ffs", "fck", "nfsw"}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (as in the reference implementation)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _load_merges(bpe_path: str) -> list[tuple[str, str]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    lines = lines[1 : 49152 - 256 - 2 + 1]  # the slice OpenAI's tokenizer uses
    return [tuple(line.split()) for line in lines]


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], list[tuple[str, str]]]:
    """Run CLIP BPE on one lowercase word; return the tokens and the merges applied."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts, used


def world_words() -> list[str]:
    words = set(world.SHAPES) | set(world.COLOURS) | set(world.BACKGROUNDS) | set(world.STYLES)
    words |= {"painting", "shape", "background", "a", "of", "on", "dot", "ring", "notch", "with", "mark"}
    words |= set(EXTRA_WORDS)
    return sorted(words)


def _identifier_candidates(merges: list[tuple[str, str]]) -> list[str]:
    """Three- and four-letter non-words that CLIP learned late (rare) and spells as one token."""
    taken = set(world_words())
    found = []
    for rank, (a, b) in enumerate(merges):
        tok = a + b
        if rank < 8000 or not tok.endswith("</w>"):
            continue
        w = tok[:-4]
        if not (3 <= len(w) <= 4) or any(ch not in string.ascii_lowercase for ch in w):
            continue
        # Vowel-free strings are rarely words (or slurs) in any language: "sks", "brc", "tsd".
        if any(ch in _VOWELS for ch in w) or w in taken:
            continue
        found.append(w)
    # Latest merges first: the rarer the token in CLIP's training text, the weaker its prior.
    return [w for w in reversed(found) if w not in _BLOCKLIST]


def build(bpe_path: str, out_dir: str, n_identifiers: int = 300) -> dict:
    merges = _load_merges(bpe_path)
    ranks = {m: i for i, m in enumerate(merges)}

    def single_token(word):
        parts, used = _bpe_merges_used(word, ranks)
        return (len(parts) == 1), used

    keep_merges: set[tuple[str, str]] = set()
    for w in world_words():
        ok, used = single_token(w)
        if not ok:
            raise RuntimeError(f"world word {w!r} is not one CLIP token")
        keep_merges.update(used)

    pool = []
    for w in list(CLASSIC_IDENTIFIERS) + _identifier_candidates(merges):
        if w in pool:
            continue
        ok, used = single_token(w)
        if ok:
            pool.append(w)
            keep_merges.update(used)
        if len(pool) >= n_identifiers:
            break
    if len(pool) < MIN_IDENTIFIERS:
        raise RuntimeError(f"only {len(pool)} identifier candidates")

    kept = sorted(keep_merges, key=ranks.__getitem__)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in kept]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in kept) + "\n")
    with open(os.path.join(out_dir, IDENTIFIER_POOL_FILE), "w", encoding="utf-8") as f:
        json.dump(pool, f, indent=0)
    return {"vocab_size": len(vocab), "merges": len(kept), "identifiers": len(pool)}


def load_tokenizer(path: str, model_max_length: int = 32):
    from transformers import CLIPTokenizer

    # transformers 5: pass model_max_length, or the pipeline overflows on the default 1e30.
    return CLIPTokenizer.from_pretrained(path, model_max_length=model_max_length)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", required=True, help="path to CLIP's bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(build(args.bpe, args.out))


if __name__ == "__main__":
    main()
