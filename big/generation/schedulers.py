"""Samplers by name, as people know them from AUTOMATIC1111 and diffusers.

Each request gets a fresh scheduler built from the model's own scheduler config (betas, timestep spacing,
prediction type), so a choice never leaks into another request. A name may be our key ("dpmpp_2m"), the
label AUTOMATIC1111 writes into PNG parameters ("DPM++ 2M") or the diffusers class name.
"""
from __future__ import annotations

import dataclasses

from big.errors import BadRequest


@dataclasses.dataclass(frozen=True)
class Sampler:
    key: str
    label: str  # AUTOMATIC1111's name, written into each PNG's parameters
    class_name: str
    options: tuple = ()


SAMPLERS = {s.key: s for s in (
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"),)),
    Sampler("dpmpp_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            (("algorithm_type", "dpmsolver++"), ("use_karras_sigmas", True))),
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("heun", "Heun", "HeunDiscreteScheduler"),
    Sampler("pndm", "PLMS", "PNDMScheduler", (("skip_prk_steps", True),)),
)}


def _normal(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum() or ch == "+")


_BY_NAME = {}
for _s in SAMPLERS.values():
    for _n in (_s.key, _s.label):
        _BY_NAME[_normal(_n)] = _s
    _BY_NAME.setdefault(_normal(_s.class_name), _s)  # a class name means its first (plainest) variant


def resolve(name: str | None, default: str = "ddim") -> Sampler:
    if name is None:
        name = default
    if not isinstance(name, str) or _normal(name) not in _BY_NAME:
        raise BadRequest(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return _BY_NAME[_normal(name)]


def make(sampler: Sampler, base_config):
    import diffusers

    cls = getattr(diffusers, sampler.class_name)
    return cls.from_config(base_config, **dict(sampler.options))


def label_of_scheduler(scheduler) -> str:
    """The label of a scheduler object (the model's own default, when the request named none)."""
    name = type(scheduler).__name__
    for s in sorted(SAMPLERS.values(), key=lambda s: -len(s.options)):  # the most specific match first
        if s.class_name == name and all(scheduler.config.get(k) == v for k, v in s.options):
            return s.label
    return name
