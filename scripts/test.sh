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
# One XLA compilation cache for the run, shared by both workers and by the train.py and
# serve.py processes the tests start: many tests compile the same programs (the micro
# models' steps) in different processes. A fresh folder each run, removed after it; a cache
# folder the caller set is used as it is.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  cache="$(mktemp -d)"
  trap 'rm -rf "$cache"' EXIT
  export JAX_COMPILATION_CACHE_DIR="$cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
fi
if [ "${1:-}" = "slow" ]; then
  shift
  .venv/bin/python -m pytest -m slow "$@"
else
  # The default suite compiles its XLA programs with LLVM's optimizations off: the programs
  # are the same HLO, compiled in less time, and run slower only where a test's
  # shapes are large. `slow` and the benchmarks keep XLA's default level.
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0"
  .venv/bin/python -m pytest -n 2 -m "not slow" "$@"
fi
