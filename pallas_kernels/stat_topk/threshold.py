"""Per-row threshold math shared by the statistical top-k kernels.

Pallas kernels cannot close over array constants, so the normal quantile is written here
with Python-scalar coefficients: it is the same Cephes rational approximation that
``jax.scipy.special.ndtri`` uses (the reference calls that one), evaluated in float32.
"""

import math

import jax.numpy as jnp

F32_EPS = float(jnp.finfo(jnp.float32).eps)

_P0 = (-5.99633501014107895267e1, 9.80010754185999661536e1, -5.66762857469070293439e1,
       1.39312609387279679503e1, -1.23916583867381258016e0)  # fmt: skip
_Q0 = (1.0, 1.95448858338141759834e0, 4.67627912898881538453e0, 8.63602421390890590575e1,
       -2.25462687854119370527e2, 2.00260212380060660359e2, -8.20372256168333339912e1,
       1.59056225126211695515e1, -1.18331621121330003142e0)  # fmt: skip
_P1 = (4.05544892305962419923e0, 3.15251094599893866154e1, 5.71628192246421288162e1,
       4.40805073893200834700e1, 1.46849561928858024014e1, 2.18663306850790267539e0,
       -1.40256079171354495875e-1, -3.50424626827848203418e-2,
       -8.57456785154685413611e-4)  # fmt: skip
_Q1 = (1.0, 1.57799883256466749731e1, 4.53907635128879210584e1, 4.13172038254672030440e1,
       1.50425385692907503408e1, 2.50464946208309415979e0, -1.42182922854787788574e-1,
       -3.80806407691578277194e-2, -9.33259480895457427372e-4)  # fmt: skip
_P2 = (3.23774891776946035970e0, 6.91522889068984211695e0, 3.93881025292474443415e0,
       1.33303460815807542389e0, 2.01485389549179081538e-1, 1.23716634817820021358e-2,
       3.01581553508235416007e-4, 2.65806974686737550832e-6, 6.23974539184983293730e-9)  # fmt: skip
_Q2 = (1.0, 6.02427039364742014255e0, 3.67983563856160859403e0, 1.37702099489081330271e0,
       2.16236993594496635890e-1, 1.34204006088543189037e-2, 3.28014464682127739104e-4,
       2.89247864745380683936e-6, 6.79019408009981274425e-9)  # fmt: skip


def _polyval(coefficients: tuple[float, ...], x: jnp.ndarray) -> jnp.ndarray:
    result = jnp.zeros_like(x)
    for c in coefficients:
        result = result * x + c
    return result


def ndtri(p: jnp.ndarray) -> jnp.ndarray:
    """Standard normal quantile of float32 ``p`` strictly inside (0, 1).

    Args:
      p: float32 array of probabilities, each in (0, 1).

    Returns:
      float32 array ``x`` with ``Phi(x) = p``, same shape as ``p``.
    """
    complement = jnp.where(p > -math.expm1(-2.0), 1.0 - p, p)
    w = complement - 0.5
    ww = w * w
    big = w + w * ww * (_polyval(_P0, ww) / _polyval(_Q0, ww))
    big = big * -math.sqrt(2.0 * math.pi)
    z = jnp.sqrt(-2.0 * jnp.log(complement))
    first = z - jnp.log(z) / z
    small_p = first - _polyval(_P2, 1.0 / z) / _polyval(_Q2, 1.0 / z) / z
    otherwise = first - _polyval(_P1, 1.0 / z) / _polyval(_Q1, 1.0 / z) / z
    x = jnp.where(complement > math.exp(-2.0), big, jnp.where(z >= 8.0, small_p, otherwise))
    return jnp.where(p > 1.0 - math.exp(-2.0), x, -x)


def masked_z(n_valid: jnp.ndarray, k: int) -> jnp.ndarray:
    """Per-row quantile ``Phi^-1(1 - k/n)`` for rows with ``n_valid`` entries.

    Args:
      n_valid: float32 [..., 1] count of valid entries per row.
      k: target kept count.

    Returns:
      float32 [..., 1]; meaningless (but finite) where ``n_valid <= k``.
    """
    p = 1.0 - k / jnp.maximum(n_valid, 1.0)
    return ndtri(jnp.clip(p, F32_EPS, 1.0 - F32_EPS))


def select(
    x: jnp.ndarray,
    theta: jnp.ndarray,
    form: str,
    valid: jnp.ndarray | None = None,
    keep_all: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Applies the soft or mask threshold to one block of rows.

    Args:
      x: [rows, cols] input block in its own dtype.
      theta: float32 [rows, 1] thresholds.
      form: ``"soft"`` (``max(x - theta, 0)``) or ``"mask"`` (``x`` where ``x >= theta``,
        else ``-inf``).
      valid: optional bool [rows, cols]; invalid entries give 0 (soft) or -inf (mask).
      keep_all: bool [rows, 1], required with ``valid``: rows that keep every valid entry.

    Returns:
      [rows, cols] in ``x.dtype``.
    """
    xf = x.astype(jnp.float32)
    if form == "soft":
        out = jnp.maximum(xf - theta, 0.0)
        if valid is not None:
            out = jnp.where(valid, jnp.where(keep_all, xf, out), 0.0)
        return out.astype(x.dtype)
    keep = xf >= theta
    if valid is not None:
        keep = valid & (keep_all | keep)
    return jnp.where(keep, x, -jnp.inf)
