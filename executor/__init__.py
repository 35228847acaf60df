"""BIG's Jina face: the Executor that `config.yml` loads. The service itself is the Jina-free `big` package."""
from executor.executor import BIGExecutor

__all__ = ["BIGExecutor"]
