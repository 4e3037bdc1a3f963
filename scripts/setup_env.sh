#!/usr/bin/env bash
# Creates .venv and installs the project with its pinned dependencies; a no-op when the
# installed set already matches pyproject.toml. Sourced by main.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
# The native CPU kernels (C++, XLA FFI): built from pallas_kernels/_native, a no-op while the
# sources are unchanged. Without a compiler this prints what to install and the CPU path runs
# XLA's kernels.
.venv/bin/python -m pallas_kernels._native || true
