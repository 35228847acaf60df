#!/usr/bin/env bash
# Install (if needed) and start the BIG flow on the embedded model: gRPC on localhost:${BIG_PORT:-51000}.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export JINA_HIDE_SURVEY=1 JINA_OPTOUT_TELEMETRY=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${BIG_JWT_SECRET:-}" ] && [ "${BIG_AUTH_MODE:-hs256}" = "hs256" ]; then
  mkdir -p workspace
  [ -f workspace/.jwt_secret ] || .venv/bin/python -c "import secrets; print(secrets.token_urlsafe(48))" > workspace/.jwt_secret
  export BIG_JWT_SECRET="$(cat workspace/.jwt_secret)"
  echo "BIG_JWT_SECRET not set: using the one in workspace/.jwt_secret. Mint a token with:"
  echo "  BIG_JWT_SECRET=\$(cat workspace/.jwt_secret) .venv/bin/python -m big.auth mint alice"
fi
exec .venv/bin/jina flow --uses flow.yml
