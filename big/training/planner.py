"""How the prior-preservation budget is split (the BIG metamodel recipe, seed 003).

Pure functions only: the training code asks for a plan and then fetches the images it names.

For a metamodel learning concept X of category C:
  * half of the budget goes to C: half of that to generated class images ("a C"), the rest shared
    equally by C's earlier instance concepts (replayed with their own prompt "a {id} C");
  * the other half is shared equally by the other learned categories, each again split half class
    images, half its earlier instance concepts.
A share with nobody to take it (no earlier concepts, no other categories) flows back to the class
images of its own level, so the budget is always fully used. Counts are integers that sum exactly
to the budget (largest remainder), and every earlier concept keeps at least one slot while the
budget has room for all of them.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class PriorSlot:
    kind: str  # "class" (generated "a {category}") or "instance" (an earlier concept's own images)
    category: str
    count: int
    concept_id: str | None = None
    identifier: str | None = None

    @property
    def prompt(self) -> str:
        if self.kind == "class":
            return f"a {self.category}"
        return concept_prompt(self.identifier, self.category)


def concept_prompt(identifier: str, category: str, caption: str | None = None) -> str:
    """How a concept's image is described in training and replay: "a sks dog", or with the image's own
    caption "a qzq painting of a red boat" (a style learned as a modifier composes with subjects)."""
    return f"a {identifier} {category} of {caption}" if caption else f"a {identifier} {category}"


@dataclasses.dataclass(frozen=True)
class EarlierConcept:
    concept_id: str
    identifier: str
    category: str


def _category_shares(category: str, share: Fraction, earlier: Sequence[EarlierConcept]):
    if not earlier:
        return [(("class", category, None, None), share)]
    per_instance = share / 2 / len(earlier)
    out = [(("class", category, None, None), share / 2)]
    out += [(("instance", category, c.concept_id, c.identifier), per_instance) for c in earlier]
    return out


def _largest_remainder(quotas: Sequence[Fraction], total: int) -> list[int]:
    floors = [int(q) for q in quotas]  # quotas are non-negative
    left = total - sum(floors)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def plan_prior_batch(budget: int, category: str, learned: Sequence[EarlierConcept] = (), *,
                     metamodel: bool = True) -> list[PriorSlot]:
    """Split `budget` prior images for a new concept of `category` given the concepts learned so far.

    `learned` lists the model's earlier concepts (any category). For a private model (metamodel=False)
    every slot goes to class images of `category`, as in plain DreamBooth.
    """
    if budget < 0:
        raise ValueError("budget must be >= 0")
    if not category:
        raise ValueError("category is required")
    if budget == 0:
        return []
    if not metamodel:
        return [PriorSlot("class", category, budget)]

    by_category: dict[str, list[EarlierConcept]] = {}
    for c in learned:
        by_category.setdefault(c.category, []).append(c)
    others = sorted(k for k in by_category if k != category)

    shares = []
    own = Fraction(1, 2) if others else Fraction(1)
    shares += _category_shares(category, own, by_category.get(category, []))
    for other in others:
        shares += _category_shares(other, Fraction(1, 2) / len(others), by_category[other])

    counts = _largest_remainder([s * budget for _, s in shares], budget)
    counts = _guarantee_one_each(shares, counts)
    slots = [PriorSlot(kind, cat, n, cid, ident) for ((kind, cat, cid, ident), _), n in zip(shares, counts)]
    return [s for s in slots if s.count > 0]


def _guarantee_one_each(shares, counts: list[int]) -> list[int]:
    """Give every earlier concept >= 1 slot, taken from the fullest holders, while the budget allows."""
    counts = list(counts)
    instances = [i for i, ((kind, *_), _) in enumerate(shares) if kind == "instance"]
    if sum(counts) < len(instances):
        return counts  # too small a budget to replay everyone; keep the proportional plan
    for i in instances:
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j] - (1 if j in instances else 0), -j))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def describe_plan(slots: Sequence[PriorSlot]) -> str:
    """One log line per slot, e.g. `  12 x class     "a dog"`."""
    return "\n".join(f"{s.count:4d} x {s.kind:<8} {s.prompt!r}" for s in slots)


def counts_by_category(slots: Sequence[PriorSlot]) -> Mapping[str, int]:
    out: dict[str, int] = {}
    for s in slots:
        out[s.category] = out.get(s.category, 0) + s.count
    return out
