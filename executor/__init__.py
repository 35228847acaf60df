"""BIG: personalise Stable Diffusion for many users at once (a Jina Executor)."""
from .executor import BIGExecutor

__all__ = ["BIGExecutor"]
