"""The AUTOMATIC1111 "parameters" text that every generated PNG carries, written and read back.

    a (sks:1.2) dog on a beach
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 4.0, Seed: 7, Size: 32x32, Model: meta, Model version: 3, Emphasis: context

`/generate` accepts this text as its `parameters` parameter and makes the same image again (same model
version, sampler, seed, size and emphasis mode give the same pixels). A text without an "Emphasis" field (from
AUTOMATIC1111, which writes it only when it is not its default) means AUTOMATIC1111's `original` emphasis. Our
texts end with the served UNet's dtype (", Dtype: float32"): recorded, not requested, as a service serves
one dtype, so a service of another dtype makes the image again only to within that dtype's rounding.
"""
from __future__ import annotations

import re

from big.errors import BadRequest

_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def format_infotext(prompt: str, negative_prompt: str | None, fields: dict) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _quote(v) -> str:
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' if ("," in s or ":" in s or '"' in s) else s


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        return re.sub(r"\\(.)", r"\1", s[1:-1])
    return s


def parse_infotext(text: str) -> tuple[str, str | None, dict[str, str]]:
    """(prompt, negative prompt, fields) from a parameters text; the last line holds the fields."""
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("`parameters` must be the text of a generated PNG's 'parameters' chunk")
    lines = text.strip().split("\n")
    fields_line = lines[-1]
    fields = {m.group(1).strip(): _unquote(m.group(2)) for m in _FIELD.finditer(fields_line) if m.group(1).strip()}
    if "Steps" not in fields or "Seed" not in fields:
        raise BadRequest("`parameters` has no 'Steps: ..., Seed: ...' line")
    prompt_lines, negative = [], None
    for i, line in enumerate(lines[:-1]):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line[len("Negative prompt:"):].strip()] + lines[i + 1 : -1])
            break
        prompt_lines.append(line)
    return "\n".join(prompt_lines), negative, fields


def request_from_infotext(text: str) -> tuple[str, dict]:
    """The prompt and the /generate parameters that reproduce the image the text describes."""
    prompt, negative, f = parse_infotext(text)
    try:
        width, height = (int(x) for x in f["Size"].split("x")) if "Size" in f else (None, None)
        params = {"num_inference_steps": int(f["Steps"]), "seed": int(f["Seed"]), "num_images": 1}
        if "CFG scale" in f:
            params["guidance_scale"] = float(f["CFG scale"])
    except ValueError as e:
        raise BadRequest(f"`parameters` has a malformed number: {e}") from None
    if width:
        params.update(width=width, height=height)
    if negative:
        params["negative_prompt"] = negative
    params["emphasis"] = f.get("Emphasis", "original")
    if "Sampler" in f:
        params["scheduler"] = f["Sampler"]
    model = f.get("Model")
    if model:
        if model.startswith("private:"):
            params.update(target_model="private", identifiers=model.split(":", 1)[1].split("+"))
        else:
            params["target_model"] = model
    if "Model version" in f:
        try:
            params["model_version"] = int(f["Model version"])
        except ValueError:
            raise BadRequest("`parameters` has a malformed model version") from None
    return prompt, params
