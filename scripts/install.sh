#!/usr/bin/env bash
# Create .venv, install the pinned stack (CPU torch) and BIG itself (editable: `executor` and `big` import from this
# checkout in any process, whatever its working directory). Idempotent; ~2 minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# Jina 3.34 with docarray 0.41 fails to import on Python 3.12 ("DocList ... is not subscriptable", seen on
# 3.12.3), so take python3.11 where it is installed beside a newer python3, and refuse a newer one up front.
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python3.11 >/dev/null; then PY=python3.11
else PY=python3
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "install.sh: $("$PY" -V 2>&1) found; this pin set is verified on Python 3.11 (Jina 3.34 does not" \
         "import on 3.12). Install python3.11 or set PYTHON=/path/to/python3.11." >&2
    exit 1
  }
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# --no-build-isolation: build with the setuptools just pinned (no second download); --no-deps: the pins above rule;
# no warnings: setuptools' banner about editable installs in general says nothing about this one.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
