"""Rare identifiers ("sks", "qzq") for new concepts.

An identifier must be one token for the model's tokenizer (so it is a single, weakly-primed
embedding, as in DreamBooth) and must never be handed out twice within one model.
"""
from __future__ import annotations

import json
import os
import random
import string
from typing import Iterable

from big.errors import Conflict

POOL_FILE = "rare_identifiers.json"
_VOWELS = set("aeiouy")


def is_single_token(tokenizer, word: str) -> bool:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return len(ids) == 1


def identifier_pool(tokenizer, tokenizer_dir: str | None = None, others=()) -> list[str]:
    """The ordered pool of candidate identifiers for a tokenizer (and one token in each of `others`: SDXL's
    second tokenizer).

    The embedded model ships its pool beside its tokenizer. For any other CLIP tokenizer (a real SD
    checkpoint) we derive one: vowel-free 3-4 letter word tokens, latest BPE merges (rarest) first.
    """
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, POOL_FILE)):
        with open(os.path.join(tokenizer_dir, POOL_FILE)) as f:
            pool = json.load(f)
    else:
        vocab = tokenizer.get_vocab()
        cands = []
        for tok, idx in vocab.items():
            if not tok.endswith("</w>"):
                continue
            w = tok[:-4]
            if 3 <= len(w) <= 4 and all(ch in string.ascii_lowercase for ch in w) and not (_VOWELS & set(w)):
                cands.append((idx, w))
        pool = [w for _, w in sorted(cands, reverse=True)]
    return [w for w in pool if all(is_single_token(t, w) for t in (tokenizer, *others))]


def choose_identifier(pool: Iterable[str], taken: Iterable[str], *, seed: int | None = None,
                      reserved_words: Iterable[str] = ()) -> str:
    """Pick an identifier not yet used in the model. Deterministic for a given seed."""
    taken_set = {t.lower() for t in taken} | {w.lower() for w in reserved_words}
    free = [w for w in pool if w.lower() not in taken_set]
    if not free:
        raise Conflict("this model has used every identifier in its pool; start a new metamodel")
    if seed is None:
        return free[0]
    return random.Random(seed).choice(free[: max(1, min(len(free), 64))])
