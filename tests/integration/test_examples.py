"""The notebook and the CLI, run as their users would (on the embedded model)."""
import json
import os
import subprocess
import sys

from conftest import BASE_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def notebook_code(path: str) -> str:
    """The notebook's code cells as one script; shell (!) and magic (%) lines are Colab-only."""
    nb = json.load(open(path))
    lines = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            lines += [l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("!", "%"))]
    return "\n".join(lines)


def test_quickstart_notebook_runs_end_to_end(tmp_path):
    script = tmp_path / "nb.py"
    script.write_text(notebook_code(os.path.join(REPO, "client_examples", "quickstart.ipynb")))
    scratch = tmp_path / "tmp"  # the notebook's temporary folders, to see that a given workspace makes none
    scratch.mkdir()
    env = {**os.environ, "BIG_WORKSPACE": str(tmp_path / "ws"), "BIG_BASE_MODEL": BASE_MODEL,
           "BIG_NOTEBOOK_STEPS": "5", "BIG_NOTEBOOK_FRAMES": "5", "JINA_LOG_LEVEL": "ERROR", "TMPDIR": str(scratch)}
    # A notebook is not a __main__ module that a spawned child could re-import: run it as Colab
    # does, with jina's default (fork) start method.
    env.pop("JINA_MP_START_METHOD", None)
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "identifier:" in r.stdout and "8 images" in r.stdout
    assert os.path.exists(tmp_path / "ws" / "notebook_out" / "contact_sheet.png")
    assert "sweep frames: 5 | grid images: 12" in r.stdout
    studio = tmp_path / "ws" / "notebook_studio"
    assert (studio / "sweep.gif").exists() and (studio / "grid.png").exists()
    assert not list(scratch.glob("big-notebook-*"))  # the workspace it was given is the only one
