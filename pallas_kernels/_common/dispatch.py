"""Choosing an implementation for a kernel call, and failing fast when it cannot run.

Every op accepts ``implementation`` in ``IMPLEMENTATIONS``. ``"auto"`` picks by the default
JAX backend: tpu -> ``pallas_tpu``, gpu -> ``pallas_gpu``, cpu -> ``native`` (the C++ kernels
of :mod:`pallas_kernels._native`) when they are built, else ``xla`` after a one-line warning;
anything else -> ``xla``. An op without a native kernel runs its XLA implementation for
``native``. An explicitly requested implementation that cannot run here (Pallas on the wrong
backend, native off CPU or unbuilt) raises ``ImplementationUnavailableError`` instead of
falling back; ``interpret=True`` is the one exception: it runs a Pallas implementation in
Pallas interpret mode on any backend (tests).
"""

from collections.abc import Callable, Mapping

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _native

IMPLEMENTATIONS = ("auto", "xla", "native", "pallas_tpu", "pallas_gpu")

_BACKEND_OF = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
_AUTO = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}


class ImplementationUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run on the current backend."""


def resolve_implementation(implementation: str, interpret: bool) -> str:
    """Returns the concrete implementation name to run.

    Args:
      implementation: one of ``IMPLEMENTATIONS``.
      interpret: run a Pallas implementation in Pallas interpret mode.

    Returns:
      ``"xla"``, ``"native"``, ``"pallas_tpu"`` or ``"pallas_gpu"``.

    Raises:
      ValueError: ``implementation`` is unknown, or ``interpret=True`` is combined with an
        implementation that is not an explicit Pallas one.
      ImplementationUnavailableError: a Pallas implementation was requested on a backend that
        cannot run it and ``interpret`` is False, or ``native`` off CPU or unbuilt.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if interpret and implementation not in _BACKEND_OF:
        raise ValueError(
            "interpret=True applies only to implementation='pallas_tpu' or 'pallas_gpu', "
            f"got implementation={implementation!r}"
        )
    backend = jax.default_backend()
    if implementation == "auto":
        if backend == "cpu":
            if _native.available():
                return "native"
            _native.warn_unavailable()
        return _AUTO.get(backend, "xla")
    if implementation == "native":
        if backend != "cpu":
            raise ImplementationUnavailableError(
                f"implementation='native' runs on the 'cpu' backend but JAX's default backend "
                f"is {backend!r}; use implementation='auto'"
            )
        if not _native.available():
            raise ImplementationUnavailableError(_native.unavailable_reason())
        return implementation
    needed = _BACKEND_OF.get(implementation)
    if needed is not None and backend != needed and not interpret:
        raise ImplementationUnavailableError(
            f"implementation={implementation!r} needs the {needed!r} backend but JAX's default "
            f"backend is {backend!r}; use implementation='auto' or 'xla', or pass "
            "interpret=True to run the kernel in Pallas interpret mode"
        )
    return implementation


def tpu_interpret(interpret: bool) -> pltpu.InterpretParams | bool:
    """The ``interpret`` value for a TPU ``pallas_call``: TPU interpret mode or off.

    TPU interpret mode simulates VMEM, DMAs and semaphores, which the generic interpreter
    does not model.
    """
    return pltpu.InterpretParams() if interpret else False


def forward_of(
    name: str, xla_fn: Callable, kernels: Mapping[str, Callable], block_sizes, interpret: bool
) -> Callable:
    """The forward of a resolved implementation over the op's array arguments.

    ``"xla"`` is the op's own XLA implementation (its ``xla.py``, never the reference), and so
    is ``"native"`` for an op without a native kernel; a Pallas name is its kernel called with
    the tiling and the interpret flag as keywords.
    """
    if name == "xla" or (name == "native" and "native" not in kernels):
        return xla_fn
    if name == "native":
        return kernels["native"]
    kernel = kernels[name]

    def forward(*arrays):
        return kernel(*arrays, block_sizes=block_sizes, interpret=interpret)

    return forward
