"""The backend policy: CPU formulations run only on CPU, and they compute the same products."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import REORDER

from sparse_jax import policy as backend_policy
from sparse_jax.model.products import linear, linear_rows
from sparse_jax.policy import ACCELERATOR, CPU, BackendPolicy, policy_for


def test_each_backend_has_its_policy():
    assert policy_for("cpu") is CPU and CPU.elementwise
    assert policy_for("tpu") is ACCELERATOR and policy_for("gpu") is ACCELERATOR
    assert not ACCELERATOR.elementwise
    assert policy_for("some_new_backend") is ACCELERATOR  # never the CPU trick by default
    assert policy_for() is policy_for(jax.default_backend())


@pytest.mark.parametrize(
    ("field", "value"),
    [("elementwise_max_rows", -1), ("gather_cost", 0.0), ("union_gather_cost", -2.0)],
)
def test_bad_policies_name_the_field(field, value):
    kwargs = {"elementwise_max_rows": 16, "gather_cost": 4.0, "union_gather_cost": 2.0}
    with pytest.raises(ValueError, match=f"BackendPolicy.{field}"):
        BackendPolicy(**{**kwargs, field: value})


def _primitives(fn, *args) -> set[str]:
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    # A fresh function each time: traces are cached by function, and the policy is read while
    # tracing.
    walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)
    return found


@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("product", [linear, linear_rows])
def test_accelerators_use_dots_and_every_form_agrees(monkeypatch, rows, dtype, product):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(rows, 48)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(48, 48)), dtype)
    on_cpu = product(x, w)
    cpu_prims = _primitives(product, x, w)
    # CPU: 2-16 rows, or one row of a bfloat16 weight, take the fenced elementwise form.
    elementwise = 1 < rows <= CPU.elementwise_max_rows or (rows == 1 and dtype == jnp.bfloat16)
    assert ("cond" in cpu_prims) == elementwise
    assert elementwise or "dot_general" in cpu_prims
    monkeypatch.setattr(backend_policy.jax, "default_backend", lambda: "tpu")
    prims = _primitives(product, x, w)
    assert "dot_general" in prims and "cond" not in prims
    np.testing.assert_allclose(product(x, w), on_cpu, **REORDER)
