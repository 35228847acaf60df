"""Response documents. Requests use docarray's own ImageDoc (instance images) and TextDoc (prompts).

Each response type extends a standard docarray document, so a client that only knows
`ImageDoc`/`TextDoc` still reads the image bytes and the text.
"""

from typing import Optional

from docarray import BaseDoc
from docarray.documents import ImageDoc, TextDoc


class ConceptDoc(TextDoc):
    """`text` is the identifier; `prompt` is how to use it ("a sks dog")."""

    prompt: Optional[str] = None
    category: Optional[str] = None
    target_model: Optional[str] = None
    model_version: Optional[int] = None
    job_id: Optional[str] = None
    status: Optional[str] = None
    mine: Optional[bool] = None
    method: Optional[str] = None  # dreambooth, lora, textual_inversion
    author: Optional[str] = None  # /admin: who taught a metamodel concept
    routed: Optional[bool] = None  # /admin: whether the current metamodel version routes prompts to it


class GeneratedImageDoc(ImageDoc):
    """`bytes_` is a PNG whose 'parameters' text chunk says how to make it again."""

    text: Optional[str] = None  # the prompt
    seed: Optional[int] = None
    parameters: Optional[str] = None  # AUTOMATIC1111-style parameters text
    target_model: Optional[str] = None
    model_version: Optional[int] = None
    kind: Optional[str] = None  # "image"; from /sweep also one "animation" (GIF), from /grid one "contact_sheet"


class JobSecondsDoc(BaseDoc):
    """Where an ended job's seconds went, its stages in order (`big.jobs.JOB_STAGES`), and `total` from /finetune
    to its end."""

    queue: Optional[float] = None
    load: Optional[float] = None
    class_images: Optional[float] = None
    train: Optional[float] = None
    commit: Optional[float] = None
    total: Optional[float] = None


class JobDoc(TextDoc):
    """`text` is the job id."""

    status: Optional[str] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    eta_s: Optional[float] = None
    error: Optional[str] = None
    identifier: Optional[str] = None
    category: Optional[str] = None
    target_model: Optional[str] = None
    model_version: Optional[int] = None
    seconds: Optional[JobSecondsDoc] = None  # an ended job's


class ConceptFileDoc(TextDoc):
    """A concept file (/export's answer, /import's input): `bytes_` is the file, `text` its file name, e.g.
    `pytorch_lora_weights.safetensors` (diffusers `load_lora_weights`), `learned_embeds.safetensors`
    (diffusers `load_textual_inversion`, AUTOMATIC1111) or `<word>.pt` (AUTOMATIC1111)."""

    identifier: Optional[str] = None
    method: Optional[str] = None
    sha256: Optional[str] = None
