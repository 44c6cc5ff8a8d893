"""Binarizers: sign in the forward pass, a surrogate gradient in the backward.

Every function here is pure and jittable. ``sign`` follows the BNN convention
``sign(x) = +1 if x >= 0 else -1``: it never returns 0. Forward values are
exactly -1/+1 (times a scale for weight binarizers) in the dtype of the input.

Activation binarizers (``x`` real input, ``g`` incoming cotangent):

* ``ste_sign``    BinaryNet straight-through estimator.
* ``approx_sign`` Bi-Real Net piecewise-polynomial surrogate.
* ``ede_sign``    IR-Net error decay estimator, ``k`` and ``t`` arrays.
* ``swish_sign``  BNN+ / Larq SignSwish.

Weight binarizers take a Flax kernel whose LAST axis is the output channel
(HWIO for convolutions, (in, out) for dense layers) and reduce over all other
axes: ``xnor_weight``, ``irnet_weight``, ``wsd_weight``.

The registry that names them (``get('ste_sign(clip=1.5)')``, ``register``)
is :mod:`cmim_jax.quantizers`, one layer up; its names are re-exported here
(``binarize.get``, ``binarize.register``, ...) and load it on first use.
See ``docs/CONTRACTS.md``.
"""
from __future__ import annotations

import importlib
import math
import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# Only ever read through dict(DEFAULT_SCHEDULE): the EDE forward pass does not
# depend on k and t, so k = t = 1 is a neutral stand-in for init and eval.
DEFAULT_SCHEDULE: Mapping[str, float] = types.MappingProxyType({"k": 1.0, "t": 1.0})


def sign(x: Array) -> Array:
  """``+1`` where ``x >= 0`` else ``-1``, in ``x.dtype`` (zero gradient)."""
  return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def _reduce_axes(w: Array) -> tuple[int, ...]:
  if w.ndim < 2:
    raise ValueError(f"weight binarizers need a kernel with ndim >= 2 whose last "
                     f"axis is the output channel, got shape {w.shape}")
  return tuple(range(w.ndim - 1))


def _ste_fwd(x, clip):
  # A boolean mask is all the backward pass needs: 1 byte instead of a copy.
  return sign(x), jnp.abs(x) <= clip


def _ste_bwd(clip, mask, g):
  del clip
  return (jnp.where(mask, g, jnp.zeros_like(g)),)


_ste_sign_vjp = jax.custom_vjp(lambda x, clip: sign(x), nondiff_argnums=(1,))
_ste_sign_vjp.defvjp(_ste_fwd, _ste_bwd)


def ste_sign(x: Array, clip: float = 1.0) -> Array:
  r"""Sign with the clipped straight-through estimator.

  Forward: :math:`q(x) = \mathrm{sign}(x)`, with ``sign(0) = +1``.

  Surrogate gradient: :math:`\partial q / \partial x = 1_{|x| \le \mathrm{clip}}`
  (the boundary ``|x| == clip`` passes the gradient).

  Args:
    x: input of any shape and float dtype.
    clip: non-differentiable Python float; gradients pass where ``|x| <= clip``.

  Returns:
    ``-1``/``+1`` with the shape and dtype of ``x``.

  References:
    Courbariaux, Hubara et al., "Binarized Neural Networks", NeurIPS 2016.
  """
  return _ste_sign_vjp(x, float(clip))


@jax.custom_vjp
def approx_sign(x: Array) -> Array:
  r"""Sign with the Bi-Real Net ApproxSign gradient.

  Forward: :math:`q(x) = \mathrm{sign}(x)`, with ``sign(0) = +1``.

  Surrogate gradient (derivative of a piecewise quadratic approximation):

  .. math::
     \partial q / \partial x = \begin{cases}
       2 + 2x & -1 \le x < 0 \\ 2 - 2x & 0 \le x \le 1 \\ 0 & \text{otherwise}
     \end{cases} \;=\; \max(0,\, 2 - 2|x|).

  Args:
    x: input of any shape and float dtype.

  Returns:
    ``-1``/``+1`` with the shape and dtype of ``x``.

  References:
    Liu et al., "Bi-Real Net", ECCV 2018.
  """
  return sign(x)


def _approx_fwd(x):
  return sign(x), x


def _approx_bwd(x, g):
  grad = jnp.maximum(0.0, 2.0 - 2.0 * jnp.abs(x.astype(jnp.float32)))
  return ((g.astype(jnp.float32) * grad).astype(g.dtype),)


approx_sign.defvjp(_approx_fwd, _approx_bwd)


@jax.custom_vjp
def _ede_sign(x, k, t):
  del k, t
  return sign(x)


def _ede_fwd(x, k, t):
  return sign(x), (x, k, t)


def _ede_bwd(res, g):
  x, k, t = res
  tx = jnp.tanh(t * x.astype(jnp.float32))
  dx = (g.astype(jnp.float32) * (k * t * (1.0 - tx * tx))).astype(g.dtype)
  # k and t are schedule values, not trained: zero (never None) cotangents.
  return dx, jnp.zeros_like(k), jnp.zeros_like(t)


_ede_sign.defvjp(_ede_fwd, _ede_bwd)


def ede_sign(x: Array, k: Any, t: Any) -> Array:
  r"""Sign with IR-Net's Error Decay Estimator (EDE) gradient.

  Forward: :math:`q(x) = \mathrm{sign}(x)`, with ``sign(0) = +1``.

  Surrogate gradient: :math:`\partial q / \partial x = k\,t\,(1 - \tanh^2(t x))`,
  the derivative of :math:`k \tanh(t x)`. ``t`` grows during training (see
  :func:`ede_schedule`) so the surrogate tends to the sign function.

  ``k`` and ``t`` are ordinary array arguments (scalars or broadcastable to
  ``x``), so a jitted caller is not retraced when their values change; they
  receive zero cotangents.

  Args:
    x: input of any shape and float dtype.
    k: gradient scale, array-like.
    t: gradient sharpness, array-like.

  Returns:
    ``-1``/``+1`` with the shape and dtype of ``x``.

  References:
    Qin et al., "Forward and Backward Information Retention for Accurate
    Binary Neural Networks" (IR-Net), CVPR 2020.
  """
  return _ede_sign(x, jnp.asarray(k, jnp.float32), jnp.asarray(t, jnp.float32))


def ede_schedule(progress: Any, t_min: float = 0.1,
                 t_max: float = 10.0) -> tuple[Array, Array]:
  r"""IR-Net's EDE schedule for ``(k, t)``.

  .. math::
     t = T_{min} \cdot 10^{\,p \log_{10}(T_{max}/T_{min})}, \qquad
     k = \max(1/t,\, 1),

  with ``p = progress = epoch / num_epochs`` in [0, 1]. Jittable: pass
  ``progress`` as an array so that the caller is not retraced.

  Where the start values come from (``t_max = 10`` in all of them):

  * ``0.1`` (this default): the IR-Net paper, and IR-Net's code for 1w1a
    VGG-small and 1w32a ResNet-20 (``CIFAR-10/VGG-Small/main.py``,
    ``CIFAR-10/ResNet20/1w32a/trainer.py``).
  * ``1e-3``: IR-Net's code for its 1w1a ResNet-20
    (``CIFAR-10/ResNet20/1w1a/trainer.py``), the recipe behind its 1w1a
    CIFAR-10 result; also SD-BNN's code for ResNet-18/20 (SD-BNN VGG-small:
    ``0.1``). IR-Net's released ResNet-18 code has no schedule.
  * ``1e-2``: CMIM's code (its ``--Tmin`` default; ``configs/default.py``).

  Args:
    progress: training progress in [0, 1] (array-like).
    t_min: ``t`` at the start (see above).
    t_max: ``t`` at the end.

  Returns:
    ``(k, t)`` float32 arrays shaped like ``progress``.
  """
  p = jnp.asarray(progress, jnp.float32)
  t_min = jnp.asarray(t_min, jnp.float32)
  t = t_min * jnp.power(10.0, p * jnp.log10(jnp.asarray(t_max, jnp.float32) / t_min))
  k = jnp.maximum(1.0 / t, 1.0)
  return k.astype(jnp.float32), t.astype(jnp.float32)


def _swish_grad(x, beta):
  bx = beta * x
  # cosh overflows to inf for large |x|, giving the correct limit 0.
  return beta * (2.0 - bx * jnp.tanh(bx / 2.0)) / (1.0 + jnp.cosh(bx))


def _swish_fwd(x, beta):
  return sign(x), x


def _swish_bwd(beta, x, g):
  grad = _swish_grad(x.astype(jnp.float32), beta)
  return ((g.astype(jnp.float32) * grad).astype(g.dtype),)


_swish_sign_vjp = jax.custom_vjp(lambda x, beta: sign(x), nondiff_argnums=(1,))
_swish_sign_vjp.defvjp(_swish_fwd, _swish_bwd)


def swish_sign(x: Array, beta: float = 5.0) -> Array:
  r"""Sign with the SignSwish gradient of BNN+ (as in Larq).

  Forward: :math:`q(x) = \mathrm{sign}(x)`, with ``sign(0) = +1``.

  Surrogate gradient, the derivative of
  :math:`2\sigma(\beta x)\,(1 + \beta x (1 - \sigma(\beta x))) - 1`:

  .. math::
     \partial q / \partial x =
       \frac{\beta\,(2 - \beta x \tanh(\beta x / 2))}{1 + \cosh(\beta x)}.

  Args:
    x: input of any shape and float dtype.
    beta: non-differentiable Python float, sharpness of the surrogate.

  Returns:
    ``-1``/``+1`` with the shape and dtype of ``x``.

  References:
    Darabi et al., "BNN+: Improved Binary Network Training", 2018;
    larq ``SwishSign``.
  """
  return _swish_sign_vjp(x, float(beta))


def _xnor_fwd(w):
  axes = _reduce_axes(w)
  alpha = jnp.mean(jnp.abs(w), axis=axes, keepdims=True)
  return alpha * sign(w), jnp.abs(w) <= 1.0


def _xnor_bwd(mask, g):
  return (jnp.where(mask, g, jnp.zeros_like(g)),)


@jax.custom_vjp
def xnor_weight(w: Array) -> Array:
  r"""XNOR-Net / ReActNet weight binarization with a per-channel scale.

  Forward: :math:`W_b = \alpha_c\,\mathrm{sign}(W)`,
  :math:`\alpha_c = \frac{1}{n}\sum_{i \in c} |W_i|` over each output channel
  (the last axis).

  Surrogate gradient (ReActNet's released code): the scale is not
  differentiated and does not multiply the gradient; the sign uses the clipped
  STE, :math:`\partial W_b / \partial W = 1_{|W| \le 1}` elementwise.

  Args:
    w: latent kernel, output channels on the last axis.

  Returns:
    ``+-alpha_c`` with the shape and dtype of ``w``.

  References:
    Rastegari et al., "XNOR-Net", ECCV 2016; Liu et al., "ReActNet", ECCV 2020.
  """
  return _xnor_fwd(w)[0]


xnor_weight.defvjp(_xnor_fwd, _xnor_bwd)


def irnet_weight(w: Array, k: Any, t: Any) -> Array:
  r"""IR-Net Libra-PB weight binarization.

  Forward, per output channel c (statistics over all axes but the last):

  .. math::
     W' = \frac{W - \mu_c}{\sigma_c}, \qquad
     W_b = \mathrm{sign}(W') \cdot 2^{\mathrm{round}(\log_2 \overline{|W'|}_c)},

  with :math:`\sigma_c` the unbiased (n - 1) standard deviation.

  Surrogate gradient: exact gradients through :math:`\mu_c` and
  :math:`\sigma_c` (balance and standardization are part of the graph), the
  EDE gradient :math:`k t (1 - \tanh^2(t W'))` for the sign (see
  :func:`ede_sign`), and the power-of-two scale detached (a constant that
  multiplies the gradient). No epsilon is added to :math:`\sigma_c`, as in the
  paper: a constant filter gives NaN.

  Args:
    w: latent kernel, output channels on the last axis.
    k: EDE gradient scale (array-like).
    t: EDE sharpness (array-like).

  Returns:
    ``+-s_c`` (``s_c`` a power of two) with the shape and dtype of ``w``.

  References:
    Qin et al., "Forward and Backward Information Retention for Accurate
    Binary Neural Networks" (IR-Net), CVPR 2020.
  """
  axes = _reduce_axes(w)
  n = math.prod(w.shape[a] for a in axes)
  if n < 2:
    raise ValueError(f"irnet_weight needs >= 2 weights per output channel for "
                     f"the unbiased std, got kernel shape {w.shape}")
  mean = jnp.mean(w, axis=axes, keepdims=True)
  std = jnp.std(w, axis=axes, keepdims=True, ddof=1)
  w_std = (w - mean) / std
  scale = jax.lax.stop_gradient(jnp.exp2(jnp.round(jnp.log2(
      jnp.mean(jnp.abs(w_std.astype(jnp.float32)), axis=axes, keepdims=True)))))
  return ede_sign(w_std, k, t) * scale.astype(w.dtype)


def wsd_weight(w: Array, a: Array, k: Any, t: Any) -> Array:
  r"""SD-BNN weight self-distribution (WSD) binarization.

  Forward, per output channel c:

  .. math::
     W' = W + \sigma(a_c) \cdot 0.01 \cdot \overline{W}_c, \qquad
     W_b = \mathrm{sign}(W'),

  no scale factor. ``a`` is a learned per-output-channel parameter
  (initialised to 0; :class:`cmim_jax.layers.BinaryConv` creates it).

  Surrogate gradient: the channel mean :math:`\overline{W}_c` is detached;
  the gradient reaches ``W`` (identity through the shift) and ``a`` (through
  :math:`\sigma(a_c)`), both times the EDE gradient of :func:`ede_sign`.

  Args:
    w: latent kernel, output channels on the last axis.
    a: shift logits, shape ``(w.shape[-1],)``.
    k: EDE gradient scale (array-like).
    t: EDE sharpness (array-like).

  Returns:
    ``-1``/``+1`` with the shape and dtype of ``w``.

  References:
    Xue et al., "Self-Distribution Binary Neural Networks", 2021.
  """
  axes = _reduce_axes(w)
  if a.shape != (w.shape[-1],):
    raise ValueError(f"wsd_weight: a must have shape ({w.shape[-1]},) for kernel "
                     f"{w.shape}, got {a.shape}")
  mean = jax.lax.stop_gradient(jnp.mean(w, axis=axes, keepdims=False))
  shifted = w + (jax.nn.sigmoid(a) * 0.01 * mean).astype(w.dtype)
  return ede_sign(shifted, k, t)


def identity(x: Array) -> Array:
  """Full precision: returns ``x`` unchanged (for FP twins)."""
  return x


# The registry's names, kept reachable as binarize.<name> for code written
# before it moved to cmim_jax.quantizers. Loaded lazily (PEP 562) so that
# importing these pure functions never imports the registry above them.
_QUANTIZERS_NAMES = frozenset({
    "ParamSpec", "Quantizer", "QuantizerLike", "register", "names", "get",
    "is_identity", "owned_params", "parse_identifier", "_REGISTRY"})


def __getattr__(name: str) -> Any:
  if name in _QUANTIZERS_NAMES:
    return getattr(importlib.import_module("cmim_jax.quantizers"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | _QUANTIZERS_NAMES)
