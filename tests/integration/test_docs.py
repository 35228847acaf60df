"""The README and docs/ as a new user meets them.

A copy of the working tree as `git clone` gives it (tracked and new files; no .venv, no workspace), in a temporary
folder. There the README's first command is started exactly as printed, then the five-minute tour's commands and
the Python snippet, each checked by what it prints and writes. Every runnable block (```bash, ```python) of
README.md and docs/*.md says on the line above it, in an HTML comment, who runs it (`<!-- docs-test: NAME -->`,
a test here) or what it needs that this machine lacks (`<!-- docs-test: skip: REASON -->`); an unmarked one fails.
The blocks are read from the pages on each run: when the README changes, the test follows it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from PIL import Image

from conftest import postgres_database
from executor.flow_process import REPO

PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
RUNNABLE = {"bash", "sh", "shell", "console", "python"}
# Who runs a marked block: these tests. Any other marker is `skip: REASON`.
RUNNERS = {"start": "test_the_first_command_and_the_tour", "tour": "test_the_first_command_and_the_tour",
           "suite": "test_the_test_commands_are_what_ci_runs", "cluster": "test_the_cluster_by_hand"}
MARKER = re.compile(r"^<!-- docs-test: (?P<what>[a-z]+)(?:: (?P<why>.+?))? -->$")
# Lines that start a server: run in the background until they say they are ready.
SERVERS = {"./scripts/serve.sh": "Flow is ready to serve", "jina flow --uses": "Flow is ready to serve",
           "python -m big.worker": "BIG worker ready"}
# The README's port: nothing else in the suite serves on it (flows in tests take free ports).
README_PORT = 51000


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # start, tour, suite, cluster, skip
    why: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """Fenced code blocks of a page with the `docs-test` marker on the line above each, if any."""
    lines = open(os.path.join(REPO, page)).read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = MARKER.match(lines[i - 1].strip()) if i else None
        out.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                         above and above.group("what"), above and above.group("why")))
        i = end + 1
    return out


def runnable() -> list[Block]:
    return [b for p in PAGES for b in blocks(p) if b.lang in RUNNABLE]


def marked(what: str) -> list[Block]:
    return [b for b in runnable() if b.marker == what]


def commands(block: Block) -> list[tuple[str, str | None]]:
    """A shell block's commands (backslash continuations joined), each with the output its `#   -> ` comment
    line promises (None if none); other comment lines are dropped."""
    out: list[tuple[str, str | None]] = []
    pending = ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        promise = re.match(r"^#\s+-> (.*?)(?: \.\.\.)?$", line)
        if promise and out:
            out[-1] = (out[-1][0], promise.group(1))
            continue
        if not pending and (not line or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((pending + line, None))
        pending = ""
    return out


def strip_comment(command: str) -> str:
    """The command without a trailing `# ...` (a shell would ignore it too; kept out of logs)."""
    return re.sub(r"\s+#\s.*$", "", command)


# ---------------------------------------------------------------------------------------------------- the pages


def test_every_runnable_block_is_run_or_says_why_not():
    """Each ```bash or ```python block is run by a test here, or marked with what it needs that this machine
    lacks; the report lists which blocks were skipped and why."""
    every = runnable()
    unmarked = [b.where for b in every if b.marker is None]
    assert not unmarked, (f"runnable blocks that no test runs and no marker explains: {unmarked}; put "
                          "`<!-- docs-test: skip: REASON -->` (or a runner: " + ", ".join(RUNNERS) + ") above each")
    unknown = [b.where for b in every if b.marker not in RUNNERS and not (b.marker == "skip" and b.why)]
    assert not unknown, f"blocks with a marker that is neither a runner nor `skip: REASON`: {unknown}"
    ran = [b for b in every if b.marker in RUNNERS]
    skipped = [b for b in every if b.marker == "skip"]
    print(f"\ndocs blocks: {len(ran)} run by tests, {len(skipped)} skipped")
    for b in ran:
        print(f"  ran      {b.where:28s} by {RUNNERS[b.marker]}")
    for b in skipped:
        print(f"  skipped  {b.where:28s} {b.why}")
    # The first command of the README is the one that starts BIG.
    first = next(b for b in every if b.page == "README.md")
    assert first.marker == "start" and "./scripts/serve.sh" in first.text


def test_the_test_commands_are_what_ci_runs():
    """CI runs the README's install and test commands: `.ci/run` calls the install script that the first command
    runs and, verbatim, the README's test command."""
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "./scripts/install.sh" in ci and "./scripts/install.sh" in open(os.path.join(REPO, "scripts", "serve.sh")).read()
    readme_tests = [strip_comment(c) for b in marked("start") + marked("suite") for c, _ in commands(b)
                    if "pytest" in c and b.page == "README.md"]
    assert readme_tests, "the README prints no test command"
    full = readme_tests[0]
    assert re.search(rf"(^|\s){re.escape(full)}(\s|$)", ci, flags=re.M), f".ci/run does not run {full!r}"


# ------------------------------------------------------------------------------------------------ the user's road


def working_tree_copy(dest) -> str:
    """The working tree as a clone of it would be: every file git tracks or would track (new, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    root = str(dest / "big")
    for f in filter(None, files):
        src = os.path.join(REPO, f)
        if os.path.isfile(src) or os.path.islink(src):
            os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(root, f), follow_symlinks=False)
    return root


def seed_venv(root: str) -> None:
    """A .venv in the copy that sees this one's installed packages (a .pth line), so that `scripts/install.sh`
    (run by the first command, as printed) finds the pinned stack installed, as on a user's second start, and only
    installs BIG itself there; a first install from nothing is what `.ci/run` does on its clean clone."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", os.path.join(root, ".venv")], check=True)
    ours = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    theirs = glob.glob(os.path.join(root, ".venv", "lib", "python*", "site-packages"))[0]
    with open(os.path.join(theirs, "_big_test_outer.pth"), "w") as f:
        f.write(ours + "\n")
    # The console scripts of those packages (jina, pip, ...), as their install made them, for the copy's python.
    ours_bin, theirs_bin = os.path.dirname(sys.executable), os.path.join(root, ".venv", "bin")
    for name in os.listdir(ours_bin):
        path = os.path.join(ours_bin, name)
        if name.startswith(("python", "activate")) or not os.path.isfile(path) or os.path.islink(path):
            continue
        with open(path, "rb") as f:
            first, rest = f.readline(), f.read()
        if first.startswith(b"#!") and b"python" in first:
            with open(os.path.join(theirs_bin, name), "wb") as f:
                f.write(f"#!{theirs_bin}/python\n".encode() + rest)
            os.chmod(os.path.join(theirs_bin, name), 0o755)


def user_environment(home: str) -> dict:
    """A user's shell: this machine's PATH and locale, none of the suite's settings for BIG, Jina or Python."""
    keep = {"PATH", "LANG", "LC_ALL", "TERM", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "JINA_HUB_ROOT", "TMPDIR",
            "OMP_NUM_THREADS", "OMP_WAIT_POLICY"}  # the test worker's share of the cores (tests/conftest.py)
    env = {k: v for k, v in os.environ.items() if k in keep}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)]
    env.update(PATH=os.pathsep.join(path), HOME=home, HF_HUB_OFFLINE="1", JINA_HIDE_SURVEY="1",
               JINA_OPTOUT_TELEMETRY="1")
    return env


class Shell:
    """The user's terminal in the copy: commands run one after another with bash, `export`s and `source`s carried
    to the next; servers run in the background until they print that they are ready."""

    def __init__(self, root: str, env: dict, logs):
        self.root, self.env, self.logs = root, dict(env), logs
        self.servers: list[tuple[subprocess.Popen, object]] = []
        self.ran: list[str] = []

    def _script(self, command: str) -> str:
        return f"set -eo pipefail\n{command}\n"

    def run(self, command: str, timeout: float = 300) -> str:
        state = self.logs / f"env-{time.time_ns()}"
        r = subprocess.run(["bash", "-c", self._script(command) + f"export -p > {shlex.quote(str(state))}\n"],
                           cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"`{command}` exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        self.env = exported(state)
        self.ran.append(command)
        return r.stdout

    def start(self, command: str, ready: str, timeout: float = 600) -> None:
        log_path = self.logs / f"server-{time.time_ns()}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(["bash", "-c", self._script(f"exec {command}")], cwd=self.root, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((proc, log))
        deadline = time.time() + timeout
        while ready not in open(log_path, errors="replace").read():
            assert proc.poll() is None, f"`{command}` exited {proc.returncode}:\n{tail(log_path)}"
            assert time.time() < deadline, f"`{command}` not ready after {timeout:.0f} s:\n{tail(log_path)}"
            time.sleep(0.5)
        self.ran.append(command)

    def stop(self) -> None:
        for proc, log in reversed(self.servers):
            with_grace(proc)
            log.close()
        self.servers.clear()


def exported(path) -> dict:
    """`export -p`'s output as an environment."""
    env = {}
    for m in re.finditer(r'^declare -x (\w+)="((?:[^"\\]|\\.)*)"$', open(path).read(), flags=re.M):
        env[m.group(1)] = re.sub(r'\\(["\\$`])', r"\1", m.group(2))
    return env


def with_grace(proc: subprocess.Popen) -> None:
    """Ctrl-C, as the README says to stop it; then whatever is left of its process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path, n: int = 3000) -> str:
    return open(path, errors="replace").read()[-n:]


def run_block(shell: Shell, block: Block, promised: list[str]) -> None:
    """A shell block's commands in turn: servers started and awaited, the test command left to this suite (the
    test above holds it to .ci/run), the rest run and held to the output their comment lines promise."""
    for command, promise in commands(block):
        command = strip_comment(command).strip()
        if "pytest" in command:
            continue
        server = next((ready for start, ready in SERVERS.items() if start in command.replace(".venv/bin/", "")), None)
        if server:
            shell.start(command.rstrip("& "), server)
            continue
        out = shell.run(command)
        if promise:
            assert promise in out, f"{block.where}: `{command}` printed\n{out[-2000:]}\nnot {promise!r}"
            promised.append(promise)


def run_python(shell: Shell, block: Block) -> None:
    script = os.path.join(shell.root, f"snippet_{block.page.replace('/', '_')}_{block.line}.py")
    with open(script, "w") as f:
        f.write(block.text)
    shell.run(f".venv/bin/python {shlex.quote(os.path.basename(script))}")


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    root = working_tree_copy(tmp)
    seed_venv(root)
    (tmp / "logs").mkdir()
    (tmp / "home").mkdir()
    return root, tmp


def test_the_first_command_and_the_tour(copy):
    """From a fresh copy: the README's first command starts BIG (installing BIG into the copy's .venv on the way)
    and the tour's commands run as printed; then `jina flow --uses flow.yml` (what the first command runs) starts
    BIG on a fresh workspace, and with a token minted as the tour mints it the Python snippet runs as printed. Each
    start so teaches a concept (with the steps the README gives) and generates with it."""
    root, tmp = copy
    starts, tours = marked("start"), marked("tour")
    assert [b.page for b in starts] == ["README.md"] * 2 and "./scripts/serve.sh" in starts[0].text
    shell_tours = [b for b in tours if b.lang != "python"]
    snippets = [b for b in tours if b.lang == "python"]
    assert shell_tours and snippets, "the README's tour needs its commands and its Python snippet"
    minting = [c for c, _ in commands(shell_tours[0]) if "big.auth mint" in c]
    journeys = [shell_tours, [Block(shell_tours[0].page, shell_tours[0].line, "bash", "\n".join(minting) + "\n",
                                    "tour", None), *snippets]]
    for start, journey in zip(starts, journeys):
        shell = Shell(root, user_environment(str(tmp / "home")), tmp / "logs")
        promised: list[str] = []
        for folder in ("workspace", "out"):  # each start on a fresh workspace, as on a new machine
            shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, "first.png"))
        try:
            t0 = time.time()
            run_block(shell, start, promised)
            ready = time.time() - t0
            for block in journey:
                run_python(shell, block) if block.lang == "python" else run_block(shell, block, promised)
            print(f"\n{start.where} ({strip_comment(commands(start)[0][0])}): ready in {ready:.1f} s; then "
                  f"{', '.join(b.where + ' ' + b.lang for b in journey)} in {time.time() - t0 - ready:.1f} s; "
                  f"promised output seen: {promised}")
        finally:
            shell.stop()
        assert os.path.exists(os.path.join(root, "workspace", ".jwt_secret"))
        if journey is shell_tours:
            pngs = sorted(glob.glob(os.path.join(root, "out", "*.png")))
            assert len(pngs) >= 5 and os.path.join(root, "out", "contact_sheet.png") in pngs, pngs
        else:
            with Image.open(os.path.join(root, "first.png")) as im:
                im.load()
                assert im.size[0] >= 32 and "parameters" in im.text
        # Ctrl-C left nothing serving on the README's port.
        assert subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{README_PORT}"],
                              capture_output=True).returncode != 0, f"something still serves on {README_PORT}"


def test_the_cluster_by_hand(copy):
    """The README's by-hand cluster: serving replicas from deploy/flow-serving.yml and a worker, started as printed
    over PostgreSQL and one store; the block's `export` of the deployment's own database and store is given this
    machine's (a database made for the test, a temporary folder)."""
    root, tmp = copy
    (block,) = marked("cluster")
    gen = postgres_database("big_docs")
    url = next(gen)
    env = user_environment(str(tmp / "home"))
    shell = Shell(root, env, tmp / "logs")
    ours = {"BIG_DATABASE_URL": url, "BIG_WORKSPACE": str(tmp / "store")}
    text = re.sub(r"^export (BIG_DATABASE_URL=\S+ ?)?(BIG_WORKSPACE=\S+)?.*$",
                  "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in ours.items()), block.text, flags=re.M)
    assert text != block.text, f"{block.where} no longer exports BIG_DATABASE_URL and BIG_WORKSPACE"
    try:
        shell.run("./scripts/install.sh")  # "with BIG installed as above"
        run_block(shell, Block(block.page, block.line, block.lang, text, block.marker, block.why), [])
        token = shell.run(".venv/bin/python -m big.auth mint alice").strip()
        out = shell.run(f".venv/bin/python -m client_examples.cli --token {token} concepts")
        assert "error" not in out.lower()
        print(f"\n{block.where}: the serving replicas and the worker started as printed: {shell.ran[1:4]}")
    finally:
        shell.stop()
        gen.close()
