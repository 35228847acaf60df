"""Where a benchmark leaves its results: a JSON report and, beside it, a contact sheet of what it scored."""
import json
import os

from big.generation.sheets import captioned_sheet


def write_report(out_dir: str, stem: str, report: dict, cells=None, **sheet_kw) -> None:
    """`{stem}.json` in `out_dir` (made if missing) and, when `cells` ((image, caption) pairs) are given,
    `{stem}.png`, their captioned sheet (`sheet_kw`: contact_sheet's columns, title...)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(report, f, indent=1)
    if cells:
        captioned_sheet(cells, **sheet_kw).save(os.path.join(out_dir, f"{stem}.png"))
