"""What a metamodel version is made of: a trunk (a whole UNet) and concept adapters routed by prompt.

A metamodel taught with the `adapters` strategy learns each concept as its own low-rank adapter plus its
identifier's embedding, trained from the trunk against class images, and never changes the trunk or an
earlier adapter. At generation a prompt gets exactly the adapters whose identifiers it uses ("a qzq
painting of a rvt bottle": the painting's and the bottle's), so teaching a concept cannot make the model
forget an earlier one, and a prompt that names no concept is served by the trunk unchanged.

The DreamBooth strategies (`seed_split` and the others) rewrite the trunk instead; a version made by one
of them is a new trunk that keeps the earlier adapters. Pure functions: the service reads and writes the
stack in each version's `big_version.json`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

_WORD = re.compile(r"[A-Za-z0-9_\-]+")

# How a metamodel keeps earlier concepts, as data (docs/metamodel.md compares them, benchmarks/continual.py measures):
#   naive       plain sequential DreamBooth: class images of the current category only
#   seed_split  the BIG recipe: prior batch split over categories and earlier instances (training/planner.py)
#   anchored    seed_split plus an L2 pull towards the weights before this concept (L2-SP)
#   replay      seed_split with twice the prior batch per step and a light L2-SP anchor
#   balanced    replay, but each step's prior batch is drawn evenly over the plan's groups (each category's
#               class images, each earlier concept), so an early concept keeps its share of every step
#   adapters    each concept its own LoRA (+ identifier embedding) over the unchanged trunk, applied to the
#               prompts that name it; learned by method 'lora' with class images only
# `replay_earlier`: plan earlier concepts and other categories into the prior batch; `prior_batch_factor`:
# prior images per step as a multiple of the instance batch; `anchor_weight`: the L2-SP weight, which a
# request's own `anchor_weight` overrides; `finetune_defaults`: over the method's defaults (rank 4: lower ranks
# did not learn the embedded model's finest marks, docs/metamodel.md).
METAMODEL_STRATEGY_SETTINGS = {
    "naive": dict(replay_earlier=False, prior_batch_factor=1, anchor_weight=0.0),
    "seed_split": dict(replay_earlier=True, prior_batch_factor=1, anchor_weight=0.0),
    "anchored": dict(replay_earlier=True, prior_batch_factor=1, anchor_weight=1e-3),
    "replay": dict(replay_earlier=True, prior_batch_factor=2, anchor_weight=2e-4),
    "balanced": dict(replay_earlier=True, prior_batch_factor=2, anchor_weight=2e-4, balanced=True),
    "adapters": dict(replay_earlier=False, prior_batch_factor=1, anchor_weight=0.0, adapters=True,
                     finetune_defaults=dict(lora_rank=4)),
}
DEFAULT_METAMODEL_STRATEGY = "adapters"
METAMODEL_STRATEGIES = tuple(METAMODEL_STRATEGY_SETTINGS)


def method_of_strategy(strategy: str) -> str:
    """The learning method a metamodel strategy implies."""
    return "lora" if METAMODEL_STRATEGY_SETTINGS[strategy].get("adapters") else "dreambooth"


@dataclasses.dataclass(frozen=True)
class Adapter:
    version: int  # the metamodel version whose folder holds the adapter's files
    concept_id: str
    identifier: str


@dataclasses.dataclass(frozen=True)
class Stack:
    trunk_version: int  # the version whose folder holds the UNet (0: the base model)
    adapters: tuple[Adapter, ...] = ()

    def to_meta(self) -> dict:
        return {"trunk_version": self.trunk_version, "adapters": [dataclasses.asdict(a) for a in self.adapters]}


EMPTY = Stack(0)


def stack_of(meta: Mapping, version: int) -> Stack:
    """The stack a version's meta records; a version written before stacks existed is its own trunk."""
    if "trunk_version" not in meta:
        return Stack(version)
    return Stack(int(meta["trunk_version"]), tuple(Adapter(int(a["version"]), a["concept_id"], a["identifier"])
                                                   for a in meta.get("adapters", ())))


def after_adapter(previous: Stack, adapter: Adapter) -> Stack:
    """The next version when a concept is taught as an adapter: same trunk, one adapter more."""
    if any(a.identifier == adapter.identifier for a in previous.adapters):
        raise ValueError(f"identifier {adapter.identifier!r} already has an adapter in this metamodel")
    return Stack(previous.trunk_version, previous.adapters + (adapter,))


def after_trunk(previous: Stack, version: int) -> Stack:
    """The next version when a DreamBooth strategy rewrites the trunk: its folder is the new trunk, and
    every earlier adapter still applies to the prompts that name it."""
    return Stack(version, previous.adapters)


def words_of(prompt: str | Iterable[str]) -> set[str]:
    """The prompt's words as the tokenizer sees them (lowercased; emphasis brackets and weights are not words);
    a prompt already read into its words (`generation.prompting.Prompt.words`) is taken as it is."""
    return {w.lower() for w in (_WORD.findall(prompt) if isinstance(prompt, str) else prompt)}


def route(prompt: str | Iterable[str], adapters: Sequence[Adapter]) -> tuple[Adapter, ...]:
    """The adapters a prompt uses: those whose identifier is one of its words, in the order they were taught."""
    words = words_of(prompt)
    return tuple(a for a in adapters if a.identifier in words)


def group_by_route(prompts: Sequence[str | Iterable[str]], adapters: Sequence[Adapter]) -> dict[tuple[Adapter, ...], list[int]]:
    """Indices of the prompts that share one set of adapters (the empty set: the trunk alone), so each
    set is activated once per request."""
    groups: dict[tuple[Adapter, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(route(p, adapters), []).append(i)
    return groups
