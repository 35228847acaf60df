"""BIG: personalise Stable Diffusion for many users at once (a Jina Executor).

The Jina layer (`BIGExecutor`) is imported only when Jina is the host or when asked for by name, so the
library underneath (`executor.service`, `executor.auth`, ...) works without importing Jina: minting a token
takes a fraction of a second instead of Jina's import, and the core runs where Jina does not (Jina 3.34 with
docarray 0.41 fails to import on Python 3.12).
"""
import sys

__all__ = ["BIGExecutor"]

if "jina" in sys.modules:  # loaded as a flow's py_module: register the Executor class with Jina now
    from .executor import BIGExecutor  # noqa: F401


def __getattr__(name):
    if name == "BIGExecutor":
        from .executor import BIGExecutor

        return BIGExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
