"""A training worker: `python -m big.worker` runs queued finetune jobs and serves nothing.

It reads the same `config.yml` as the serving Executor (its `with:` block), so both sides agree on the base model,
defaults and limits, and the same environment overrides (BIG_BASE_MODEL, BIG_WORKSPACE, BIG_DTYPE,
BIG_DATABASE_URL). Run one per GPU, beside serving replicas with `role: serve`, over one database and one store
(docs/scaling.md). SIGTERM or SIGINT stops claiming; a job still running is left to its lease, and another worker
runs it again once the lease has passed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading

import yaml

from big.config import Limits, ServiceConfig, env_overrides


def config_from_yaml(path: str, **overrides) -> ServiceConfig:
    """The ServiceConfig of an Executor config file's `with:` block, the environment and `overrides` (in rising
    precedence); keys that only the Executor reads (batch_window_s) are skipped."""
    with open(path) as f:
        given = (yaml.safe_load(f) or {}).get("with") or {}
    fields = {f.name for f in dataclasses.fields(ServiceConfig)}
    values = {k: v for k, v in given.items() if k in fields and v is not None}
    values.update(env_overrides())
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["limits"] = Limits(**(values.get("limits") or {}))
    return ServiceConfig(**values)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m big.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="config.yml", help="the Executor's config file (its `with:` block)")
    p.add_argument("--workspace", help="the shared store's folder (default: config's, or BIG_WORKSPACE)")
    p.add_argument("--database-url", help="the shared registry (default: BIG_DATABASE_URL, else SQLite in the store)")
    p.add_argument("--slots", type=int, help="jobs this worker runs at once (train_workers; one per GPU is usual)")
    p.add_argument("--threads", type=int, help="torch CPU threads of each job (train_threads)")
    p.add_argument("--lease", type=float, help="seconds a job's lease lasts without a heartbeat (job_lease_s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("BIG_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_yaml(args.config, workspace=args.workspace, database_url=args.database_url,
                              train_workers=args.slots, train_threads=args.threads, job_lease_s=args.lease,
                              role="train")
    from big.service import BIGService  # after the arguments parse: loading the model takes a while

    service = BIGService(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("big.worker").info("worker %s ready: base %s, store %s, registry on %s",
                                         service.worker.id, config.base_model, service.ws.root,
                                         service.registry.backend)
    print(f"BIG worker ready: {service.worker.id}", flush=True)
    stop.wait()
    service.close()


if __name__ == "__main__":
    main()
