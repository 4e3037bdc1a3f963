"""Builds the native CPU kernels (``python -m pallas_kernels._native`` runs :func:`main`).

Compiles ``cpu_kernels.cc`` (with ``kernels_impl.h``) against the XLA FFI headers that jaxlib
ships (``jax.ffi.include_dir()``) into a shared library under ``_build/``, named by a hash of
the sources and flags, so a library built from other sources is never loaded. Nothing is
downloaded. ``scripts/setup_env.sh`` runs this after installing the Python packages; rerunning
it is a no-op while the sources are unchanged. The compiler is ``$CXX``, else ``g++``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ("cpu_kernels.cc", "kernels_impl.h")
BUILD_DIR = HERE / "_build"
FLAGS = ("-O3", "-std=gnu++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wno-psabi")


class BuildError(RuntimeError):
    """The native kernels could not be built; the message says what to install or fix."""


def _digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def library_path() -> pathlib.Path:
    """Where the library built from the current sources is (or will be)."""
    return BUILD_DIR / f"libsparse_jax_cpu-{_digest()}.so"


def compiler() -> str:
    """The C++ compiler to use: ``$CXX`` or ``g++``, resolved on ``PATH``.

    Raises:
      BuildError: no such compiler.
    """
    name = os.environ.get("CXX") or "g++"
    found = shutil.which(name)
    if found is None:
        raise BuildError(
            f"no C++ compiler found (looked for {name!r}; set CXX to choose one): install one "
            "(for example `apt install g++`) and run `python -m pallas_kernels._native`; "
            "until then the CPU path runs XLA's kernels"
        )
    return found


def build(force: bool = False) -> pathlib.Path:
    """Builds the library if the current sources have none; returns its path.

    Raises:
      BuildError: no compiler, or the compiler failed (its output is in the message).
    """
    target = library_path()
    if target.exists() and not force:
        return target
    import jax.ffi  # the headers ship with jaxlib

    cxx = compiler()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        scratch = pathlib.Path(tmp) / target.name
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(HERE / SOURCES[0]), "-o", scratch]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(
                f"building the native CPU kernels failed ({cxx}, exit {done.returncode}):\n"
                f"{done.stderr.strip()}"
            )
        os.replace(scratch, target)  # atomic: a reader sees the old library or the whole new one
    for old in BUILD_DIR.glob("libsparse_jax_cpu-*.so"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def main() -> int:
    try:
        path = build(force="--force" in sys.argv[1:])
    except BuildError as err:
        print(f"warning: {err}", file=sys.stderr)
        return 1
    print(f"native CPU kernels: {path}")
    return 0
