"""Native CPU kernels, loaded into XLA as FFI custom calls.

:func:`load` opens the library that ``python -m pallas_kernels._native`` compiled from
this directory's sources and registers its handlers with XLA once per process. When it is
missing (no compiler at install time) :func:`unavailable_reason` says why and how to build it:
``implementation="auto"`` then runs XLA's kernels on CPU after a one-line warning, and an
explicit ``implementation="native"`` raises.

The kernels are compiled for AVX-512, AVX2 and plain x86-64; the best one the CPU supports
runs, and :func:`use_isa` selects another (the tests run each one this CPU supports).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import pathlib
import platform
import threading

import jax
import jax.numpy as jnp

from pallas_kernels._native import build as _build

log = logging.getLogger(__name__)

ISAS = ("generic", "avx2", "avx512")
TARGETS = {
    "sparse_jax_linear": "SparseJaxLinear",
    "sparse_jax_sparse_ffn": "SparseJaxSparseFfn",
    "sparse_jax_topk_attention": "SparseJaxTopkAttention",
    "sparse_jax_sparse_ffn_block": "SparseJaxSparseFfnBlock",
    "sparse_jax_spark_ffn_block": "SparseJaxSparkFfnBlock",
    "sparse_jax_spark_decode_attention": "SparseJaxSparkDecodeAttention",
    "sparse_jax_dense_decode_attention": "SparseJaxDenseDecodeAttention",
    "sparse_jax_spark_scored_attention": "SparseJaxSparkScoredAttention",
    "sparse_jax_spark_train_attention": "SparseJaxSparkTrainAttention",
    "sparse_jax_spark_train_attention_grad": "SparseJaxSparkTrainAttentionGrad",
}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False


def _open(path: pathlib.Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.sparse_jax_isa.restype = ctypes.c_int
    lib.sparse_jax_set_isa.argtypes = [ctypes.c_int]
    lib.sparse_jax_isa_supported.argtypes = [ctypes.c_int]
    return lib


def load(path: pathlib.Path | None = None) -> ctypes.CDLL | None:
    """The loaded library (registering its FFI targets on first call), or None.

    Args:
      path: a library to load instead of the one built from the current sources (tests).
    """
    global _library, _reason, _loaded
    with _lock:
        if _loaded and path is None:
            return _library
        target = _build.library_path() if path is None else pathlib.Path(path)
        if platform.machine().lower() not in ("x86_64", "amd64"):
            lib, reason = None, f"the native CPU kernels are x86-64 only, not {platform.machine()}"
        elif not target.exists():
            lib, reason = (
                None,
                (
                    f"the native CPU kernels are not built ({target.name} is missing): run "
                    "`python -m pallas_kernels._native` (scripts/setup_env.sh does)"
                ),
            )
        else:
            try:
                lib, reason = _open(target), None
            except OSError as err:
                lib, reason = None, f"the native CPU kernels at {target} do not load: {err}"
        if path is None:
            _library, _reason, _loaded = lib, reason, True
        return lib


def available() -> bool:
    """Whether the native kernels are built and loaded in this process."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run (None when they can)."""
    load()
    return _reason


@functools.cache
def warn_unavailable() -> None:
    """Logs, once per process, that ``auto`` runs XLA's kernels on CPU and why."""
    log.warning("%s; running XLA's kernels instead", unavailable_reason())


def prepare(**weights: jax.Array) -> None:
    """Before an FFI call: loads the library and checks the named weight (or cache) arrays.

    Raises:
      RuntimeError: the library is not built or does not load (the message says why and how
        to build it).
      ValueError: the arrays do not share one dtype, float32 or bfloat16.
    """
    _lib()
    dtypes = [a.dtype for a in weights.values()]
    if len(set(dtypes)) > 1 or dtypes[0] not in (jnp.float32, jnp.bfloat16):
        names = " and ".join(weights)
        got = " and ".join(str(d) for d in dtypes)
        raise ValueError(
            f"the native kernel takes {names} of one dtype, float32 or bfloat16; got {got}"
        )


def _lib() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(unavailable_reason())
    return lib


def isa() -> str:
    """The instruction set the kernels run: ``"generic"``, ``"avx2"`` or ``"avx512"``."""
    return ISAS[_lib().sparse_jax_isa()]


def supported_isas() -> tuple[str, ...]:
    """The instruction sets this CPU can run, narrowest first."""
    lib = _lib()
    return tuple(name for i, name in enumerate(ISAS) if lib.sparse_jax_isa_supported(i))


def use_isa(name: str) -> str:
    """Runs later kernel calls with instruction set ``name``; returns the previous one.

    Raises:
      ValueError: an unknown name, or one this CPU does not support.
    """
    if name not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {name!r}")
    previous = isa()
    if _lib().sparse_jax_set_isa(ISAS.index(name)) != 0:
        raise ValueError(f"this CPU cannot run isa={name!r}; it supports {supported_isas()}")
    return previous
