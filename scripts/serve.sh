#!/usr/bin/env bash
# Install (if needed) and start the BIG flow on the embedded model: gRPC on localhost:51000 (flow.yml's port).
# Without BIG_JWT_SECRET the service makes the workspace's own secret (workspace/.jwt_secret); mint a token with
#   .venv/bin/python -m big.auth mint alice
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export JINA_HIDE_SURVEY=1 JINA_OPTOUT_TELEMETRY=1
echo "Starting BIG (flow.yml) on grpc://localhost:51000; mint a token with: .venv/bin/python -m big.auth mint alice"
exec .venv/bin/jina flow --uses flow.yml
