"""A training worker: `python -m big.worker` runs queued finetune jobs and serves nothing.

It reads the same `config.yml` as the serving Executor (its `with:` block) and the same environment overrides
(`big.config.ENV_OVERRIDES`) through the same builder (`big.config.build_service_config`), so both sides agree on
the base model, defaults and limits, and a key that is no setting stops it, named. Run one per GPU, beside serving
replicas with `role: serve`, over one database and one store (docs/scaling.md). SIGTERM or SIGINT stops claiming; a job still running is left to its lease, and another worker
runs it again once the lease has passed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from big.config import ConfigError, service_config_from_file


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m big.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="config.yml", help="the Executor's config file (its `with:` block)")
    p.add_argument("--workspace", help="the shared store's folder (default: config's, or BIG_WORKSPACE)")
    p.add_argument("--database-url", help="the shared registry (default: BIG_DATABASE_URL, else SQLite in the store)")
    p.add_argument("--slots", type=int, help="jobs this worker runs at once (train_workers; one per GPU is usual)")
    p.add_argument("--threads", type=int, help="torch CPU threads of each job (train_threads)")
    p.add_argument("--lease", type=float, help="seconds a job's lease lasts without a heartbeat (job_lease_s)")
    p.add_argument("--alive-file", help="a file touched at every heartbeat (a quarter of the lease), for a liveness "
                   "probe to read its age (deploy/k8s/worker.yml)")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("BIG_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = service_config_from_file(args.config, workspace=args.workspace, database_url=args.database_url,
                                          train_workers=args.slots, train_threads=args.threads,
                                          job_lease_s=args.lease, role="train")
    except (ConfigError, OSError) as e:
        sys.exit(f"python -m big.worker: {args.config}: {e}")
    from big.service import BIGService  # after the arguments parse: loading the model takes a while

    service = BIGService(config)
    if args.alive_file:
        service.worker.keep_alive_file(args.alive_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("big.worker").info("worker %s ready: base %s, store %s, registry on %s; settings %s",
                                         service.worker.id, config.base_model, service.ws.root,
                                         service.registry.backend, json.dumps(config.described()))
    print(f"BIG worker ready: {service.worker.id}", flush=True)
    stop.wait()
    service.close()


if __name__ == "__main__":
    main()
