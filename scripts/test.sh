#!/usr/bin/env bash
# Lint and test. `scripts/test.sh` runs the default suite; `scripts/test.sh slow` runs the
# long tests only (one process). Extra arguments go to pytest. The default suite runs in
# two worker processes (pytest-xdist), one per core of the 2-core machines it is tested on.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ "${1:-}" = "slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow "$@"
fi
exec .venv/bin/python -m pytest -n 2 -m "not slow" "$@"
