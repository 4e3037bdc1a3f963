"""Shared test base for the kernel packages: every implementation against the reference.

An op's test class subclasses ``KernelTestBase`` and says how to build small cases, run the
op and build the lowering case; the base then checks, for each implementation in the class's
``IMPLEMENTATIONS`` (Pallas ones in interpret mode on CPU; the native CPU kernels once per
instruction set the CPU supports) and dtype, the forward against the jnp reference, that a
second run is bitwise identical, and that the Pallas kernels lower to Mosaic TPU and to
Triton for CUDA from this CPU-only machine. ``VjpTests`` adds the VJP check for differentiable ops.
Tolerances live here and only here.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _native

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")
NATIVE = ("native",) if _native.available() and jax.default_backend() == "cpu" else ()
DTYPES = (jnp.float32, jnp.bfloat16)

# Per-dtype tolerance of a result against the reference. bfloat16 outputs are rounded once
# from float32 accumulators, so two bf16 ulps of relative slack cover reordered sums.
TOLERANCES = {
    jnp.dtype(jnp.float32): {"atol": 2e-5, "rtol": 2e-5},
    jnp.dtype(jnp.bfloat16): {"atol": 1e-2, "rtol": 1.6e-2},
}

# The custom call each platform's Pallas lowering must produce.
LOWERING_MARKERS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
_TRITON_CHECK = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def tolerance(dtype) -> dict[str, float]:
    """The ``atol``/``rtol`` pair for results of ``dtype``."""
    return TOLERANCES[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype) -> None:
    """Asserts equal shapes and dtypes and values within the tolerance of ``dtype``."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tolerance(dtype)
    )


def lowered_text(fn, args, platform: str) -> str:
    """StableHLO text of ``jax.jit(fn)(*args)`` exported for ``platform`` from this host."""
    checks = [_TRITON_CHECK] if platform == "cuda" else []
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)
    return exported(*args).mlir_module()


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted(fn, args: tuple, kwargs_items: tuple):
    return fn(*args, **dict(kwargs_items))


def jitted(fn, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)`` under ``jax.jit`` with ``kwargs`` static, cached by ``fn``."""
    return _jitted(fn, args, tuple(sorted(kwargs.items())))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_vjp(fn, args: tuple, kwargs_items: tuple, cotangent):
    x, *rest = args
    _, vjp = jax.vjp(lambda x_: fn(x_, *rest, **dict(kwargs_items)), x)
    return vjp(cotangent)[0]


def jitted_vjp(fn, args: tuple, kwargs: dict, cotangent):
    """VJP of ``fn(*args, **kwargs)`` with respect to ``args[0]``, under ``jax.jit``."""
    return _jitted_vjp(fn, args, tuple(sorted(kwargs.items())), cotangent)


def isas(implementation: str) -> tuple[str | None, ...]:
    """The instruction sets to run ``implementation`` with: each one this CPU supports for
    the native kernels, else only the default (None)."""
    return _native.supported_isas() if implementation == "native" else (None,)


def xla_and_native(xla_module, native_module) -> list[tuple[str, object, str | None]]:
    """(name, module, instruction set) to run an op's forward-only implementations with: its
    XLA module, then its native module once per instruction set this CPU supports (when the
    native kernels are built)."""
    out = [("xla", xla_module, None)]
    if NATIVE:
        out += [("native", native_module, isa) for isa in _native.supported_isas()]
    return out


@contextlib.contextmanager
def using_isa(isa: str | None):
    """Runs the native kernels with ``isa`` inside the block (None: leave it as it is).

    The instruction set is a process-wide switch read when a kernel runs, and JAX dispatches
    asynchronously: results computed inside the block must be waited for inside it
    (``jax.block_until_ready``) to have run with ``isa``.
    """
    if isa is None:
        yield
        return
    previous = _native.use_isa(isa)
    try:
        yield
    finally:
        _native.use_isa(previous)


def implementation_options(implementation: str, block_sizes) -> dict:
    """The op's keyword options that select ``implementation`` (Pallas ones interpreted)."""
    options = {"implementation": implementation}
    if implementation.startswith("pallas"):
        options.update(interpret=True, block_sizes=block_sizes)
    return options


def make_mesh(*axis_names: str) -> jax.sharding.Mesh:
    """An Auto-axes mesh with each named axis of size 2 while devices last, else 1.

    tests/conftest.py asks for 8 host devices, so the batch and head axes really split.
    """
    sizes, left = [], jax.device_count()
    for _ in axis_names:
        size = 2 if left >= 2 else 1
        sizes.append(size)
        left //= size
    auto = (jax.sharding.AxisType.Auto,) * len(axis_names)
    return jax.make_mesh(tuple(sizes), axis_names, axis_types=auto)


def rng(seed: int) -> np.random.Generator:
    """Host-side generator: test inputs come from NumPy so that building them compiles
    nothing."""
    return np.random.default_rng(seed)


def to_device(array: np.ndarray, dtype) -> jax.Array:
    """``array`` cast on the host to ``dtype`` (bfloat16 included) and put on the device."""
    return jnp.asarray(np.asarray(array).astype(jnp.dtype(dtype)))


class KernelTestBase:
    """Forward, determinism and lowering tests shared by every kernel op.

    Subclasses set ``CASES`` (small, cheap cases for interpret mode), ``OP`` (the public
    API) and ``REFERENCE`` (the jnp oracle), both as ``staticmethod`` so that compiled cases
    are cached across tests, and implement ``make_case`` and ``lowering_case``. Pallas
    implementations run with ``interpret=True`` and ``BLOCK_SIZES`` (small blocks, so the
    interpreted kernels take several grid steps).
    """

    CASES: tuple = ()
    BLOCK_SIZES = None
    IMPLEMENTATIONS = IMPLEMENTATIONS

    def pytest_generate_tests(self, metafunc):
        """Runs each test taking ``implementation`` once per entry of ``IMPLEMENTATIONS``,
        unless the test parametrizes it itself."""
        own = set()
        for mark in metafunc.definition.iter_markers("parametrize"):
            names = mark.args[0]
            own.update(names.split(",") if isinstance(names, str) else names)
        if "implementation" in metafunc.fixturenames and "implementation" not in own:
            metafunc.parametrize("implementation", self.IMPLEMENTATIONS)

    @staticmethod
    def OP(*args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def REFERENCE(*args, **kwargs):
        raise NotImplementedError

    def make_case(self, case, dtype) -> tuple[tuple, dict]:
        """Positional arrays and keyword options of one case."""
        raise NotImplementedError

    def run(self, implementation: str, args: tuple, kwargs: dict):
        """Runs ``OP`` under jit with ``implementation`` (Pallas ones interpreted)."""
        options = implementation_options(implementation, self.BLOCK_SIZES)
        return jitted(self.OP, args, {**kwargs, **options})

    def reference(self, args: tuple, kwargs: dict):
        """Runs ``REFERENCE`` under jit."""
        return jitted(self.REFERENCE, args, kwargs)

    def lowering_case(self, implementation: str) -> tuple:
        """``(fn, abstract_args)`` calling the implementation module directly."""
        raise NotImplementedError

    def compare(self, actual, expected, args: tuple, kwargs: dict, dtype) -> None:
        """Compares one result with the reference; ops with discontinuities override it."""
        assert_close(actual, expected, dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
    def test_forward_matches_reference(self, implementation, dtype):
        for case in self.CASES:
            args, kwargs = self.make_case(case, dtype)
            expected = self.reference(args, kwargs)
            for isa in isas(implementation):
                with using_isa(isa):
                    actual = jax.block_until_ready(self.run(implementation, args, kwargs))
                self.compare(actual, expected, args, kwargs, dtype)

    def test_second_run_is_identical(self, implementation):
        args, kwargs = self.make_case(self.CASES[0], jnp.float32)
        first = self.run(implementation, args, kwargs)
        second = self.run(implementation, args, kwargs)
        np.testing.assert_array_equal(np.asarray(first), np.asarray(second))

    @pytest.mark.parametrize(
        ("pallas", "platform"), [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")]
    )
    def test_lowers_to_platform_kernel(self, pallas, platform):
        fn, args = self.lowering_case(pallas)
        assert LOWERING_MARKERS[platform] in lowered_text(fn, args, platform)


class VjpTests:
    """VJP of every implementation against the reference's VJP (mix into a test class).

    Subclasses define ``VJP_CASES`` plus the ``KernelTestBase`` hooks; the first positional
    argument is the differentiated one.
    """

    VJP_CASES: tuple = ()

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
    def test_vjp_matches_reference(self, implementation, dtype):
        for case in self.VJP_CASES:
            (x, *rest), kwargs = self.make_case(case, dtype)
            expected_out = self.reference((x, *rest), kwargs)
            cotangent = rng(7).standard_normal(expected_out.shape)
            cotangent = to_device(np.where(np.isfinite(expected_out), cotangent, 0), x.dtype)

            options = implementation_options(implementation, self.BLOCK_SIZES)
            actual = jitted_vjp(self.OP, (x, *rest), {**kwargs, **options}, cotangent)
            expected = jitted_vjp(self.REFERENCE, (x, *rest), kwargs, cotangent)
            assert bool(jnp.all(jnp.isfinite(actual.astype(jnp.float32))))
            assert_close(actual, expected, dtype)
