"""Flax binary layers: binary conv/dense with latent real kernels, and the
activation modules of ReActNet (RSign, RPReLU) and SD-BNN (ASD).

A binary layer keeps a real-valued latent ``kernel`` and quantizes it on every
read; its input is quantized too. Both quantizers are pluggable by name or
callable (see :func:`cmim_jax.binarize.get`). Each binary layer whose input
quantizer is not ``'identity'`` sows, into the collection ``'binary_acts'``,
``'a_F'`` (the latent real input it quantizes, after any input shift) and
``'a_B'`` (the quantized input it uses); ``sow`` appends, so each is a tuple
with one entry per call. ``init`` returns that collection too: drop it before
``apply``, or the next call appends a second entry.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import binarize

Array = jax.Array
Schedule = Optional[Mapping[str, Any]]
Padding = Union[str, int, Sequence[tuple[int, int]]]

BINARY_ACTS = "binary_acts"

# PyTorch's kaiming_normal_ (fan_in, gain sqrt(2)) as used by IR-Net.
default_kernel_init = nn.initializers.kaiming_normal()


def effective_kernel(layer_params: Mapping[str, Array],
                     kernel_quantizer: binarize.QuantizerLike,
                     schedule: Schedule = None) -> Array:
  """The quantized kernel a binary layer computes with.

  Args:
    layer_params: the layer's ``params`` dict: ``'kernel'`` plus any
      parameters its quantizer owns (e.g. WSD's ``'a'``).
    kernel_quantizer: the layer's kernel quantizer (name or callable).
    schedule: ``{'k': ..., 't': ...}`` for quantizers that need it.

  Returns:
    The binarized kernel, e.g. ``+-alpha_c`` per output channel, in the dtype
    of the latent kernel.
  """
  q = binarize.get(kernel_quantizer)
  owned = {n: layer_params[n] for n, _ in binarize.owned_params(q)}
  return q(layer_params["kernel"], **owned, **dict(schedule or {}))


def _quantized_inputs(module: nn.Module, x: Array, schedule: Schedule) -> Array:
  """Input shift (optional), quantization and sowing shared by binary layers."""
  x = jnp.asarray(x, module.dtype)
  if module.input_shift is not None:
    # The shift module has its own dtype field (float32 unless the factory sets
    # it); the conv needs its input in the layer's dtype, like its kernel.
    x = jnp.asarray(module.input_shift(name="input_shift")(x), module.dtype)
  x_b = binarize.get(module.input_quantizer)(x, **dict(schedule or {}))
  # Full-precision inputs (the FP twins, 1w32a layers) have no binarized
  # activation to contrast, so they sow nothing.
  if not binarize.is_identity(module.input_quantizer):
    module.sow(BINARY_ACTS, "a_F", x)
    module.sow(BINARY_ACTS, "a_B", x_b)
  return x_b


def _latent_kernel(module: nn.Module, shape: tuple[int, ...],
                   schedule: Schedule) -> Array:
  """Creates the latent kernel and quantizer-owned params; returns Wb."""
  params = {"kernel": module.param("kernel", module.kernel_init, shape,
                                   module.param_dtype)}
  for name, spec in binarize.owned_params(module.kernel_quantizer):
    params[name] = module.param(name, spec.init, spec.shape(shape), module.param_dtype)
  w_b = effective_kernel(params, module.kernel_quantizer, schedule)
  return jnp.asarray(w_b, module.dtype)


def _conv(x: Array, w: Array, strides, padding) -> Array:
  return jax.lax.conv_general_dilated(
      x, w, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _unit_and_scale(w: Array) -> tuple[Array, Array]:
  """``w = unit * scale`` per output channel (last axis), ``unit`` exactly
  ``+-1`` where ``w`` is ``+-scale``.

  ``scale`` is ``|w|`` at the channel's first entry (1 where that is 0): for
  a ``+-alpha_c`` kernel that is ``alpha_c`` itself, read with a slice rather
  than a reduction over the whole kernel (the training model re-quantizes
  its kernels on every call; at batch 1 that pass is most of the cost).
  Entries with ``|w| == scale`` (all of them in a ``+-alpha_c`` kernel) get
  exactly ``+-1``, set rather than divided: XLA rewrites a division by a
  broadcast vector as a product with its reciprocal, which is not exact.
  Any other entry (a kernel quantizer with more levels) is ``w / scale``,
  which is ``w`` up to rounding: the product ``unit * scale`` is the kernel
  whatever nonzero scale is chosen.
  """
  scale = jnp.abs(w[(0,) * (w.ndim - 1)])
  scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  unit = jnp.where(jnp.abs(w) == scale, jnp.where(w >= 0, 1, -1).astype(w.dtype), w / scale)
  return unit, scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def scale_after_conv(x: Array, w: Array, strides, padding) -> Array:
  r"""``conv(x, w)`` computed as ``conv(x, w / alpha) * alpha``, ``alpha`` per output
  channel (see :func:`_unit_and_scale`); its gradients are exactly those of
  ``conv(x, w)``.

  Why: with ``x`` and ``w / alpha`` both ``+-1`` every partial sum of the
  float convolution is an integer, exact in float32 below :math:`2^{24}`, so
  the result is the exact integer dot product times ``alpha``, rounded once:
  the same float32 value XNOR-popcount inference (``cmim_jax.export``)
  computes. Convolving ``sign(x)`` with ``+-alpha`` directly rounds every
  partial sum, so near zero it can differ in sign from the exact value and
  flip the next layer's binarization.

  Forward: :math:`y = (x \ast \hat w)\,\alpha`, :math:`\hat w = w / \alpha`,
  mathematically equal to :math:`x \ast w`. Backward: the vector-Jacobian
  product of :math:`x \ast w` (the same cotangents for ``x`` and ``w`` as a
  plain convolution, bit for bit; ``alpha`` carries no gradient of its own
  because the product does not depend on it).
  """
  unit, scale = _unit_and_scale(w)
  return _conv(x, unit, strides, padding) * scale


def _scale_after_conv_fwd(x, w, strides, padding):
  return scale_after_conv(x, w, strides, padding), (x, w)


def _scale_after_conv_bwd(strides, padding, res, g):
  x, w = res
  _, vjp = jax.vjp(lambda x, w: _conv(x, w, strides, padding), x, w)
  return vjp(g)


scale_after_conv.defvjp(_scale_after_conv_fwd, _scale_after_conv_bwd)


class BinaryConv(nn.Module):
  """2-D convolution on quantized inputs with a quantized latent kernel.

  Input NHWC, kernel HWIO (output channel last), no bias: a BatchNorm follows.
  Padding is applied after input quantization with zeros, as in the PyTorch
  references.

  Attributes:
    features: output channels.
    kernel_size: spatial kernel size.
    strides: spatial stride (int or pair).
    padding: ``'SAME'``, ``'VALID'``, an int (symmetric, PyTorch style) or
      ``((top, bottom), (left, right))``.
    input_quantizer: name or callable ``q(x, **schedule)``.
    kernel_quantizer: name or callable ``q(w, **schedule)``.
    input_shift: optional module factory applied to the input before its
      quantization (e.g. ``functools.partial(ASD, reduction=16)``).
    kernel_init: initializer of the latent kernel.
    dtype: computation dtype.
    param_dtype: dtype of the latent kernel.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Union[int, Sequence[int]] = 1
  padding: Padding = "SAME"
  input_quantizer: binarize.QuantizerLike = "ste_sign"
  kernel_quantizer: binarize.QuantizerLike = "ste_sign"
  input_shift: Optional[Callable[..., nn.Module]] = None
  kernel_init: Callable[..., Array] = default_kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, schedule: Schedule = None) -> Array:
    if x.ndim != 4:
      raise ValueError(f"BinaryConv expects NHWC input, got shape {x.shape}")
    x_b = _quantized_inputs(self, x, schedule)
    shape = (*self.kernel_size, x.shape[-1], self.features)
    w_b = _latent_kernel(self, shape, schedule)
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides))
    padding = self.padding
    if isinstance(padding, int):
      padding = ((padding, padding),) * 2
    if not isinstance(padding, str):  # hashable: a static argument below
      padding = tuple(tuple(int(v) for v in p) for p in padding)
    if binarize.is_identity(self.kernel_quantizer):
      # A real kernel (the FP twins) has no per-channel scale to factor out.
      return _conv(x_b, w_b, strides, padding)
    return scale_after_conv(x_b, w_b, strides, padding)

  def effective_kernel(self, schedule: Schedule = None) -> Array:
    """The binarized kernel (use with ``apply(..., method='effective_kernel')``)."""
    return effective_kernel(self.variables["params"], self.kernel_quantizer, schedule)


class BinaryDense(nn.Module):
  """Dense layer on quantized inputs with a quantized ``(in, out)`` kernel.

  Attributes:
    features: output features.
    input_quantizer: name or callable ``q(x, **schedule)``.
    kernel_quantizer: name or callable ``q(w, **schedule)``.
    input_shift: optional module factory applied before input quantization.
    kernel_init: initializer of the latent kernel.
    dtype: computation dtype.
    param_dtype: dtype of the latent kernel.
  """
  features: int
  input_quantizer: binarize.QuantizerLike = "ste_sign"
  kernel_quantizer: binarize.QuantizerLike = "ste_sign"
  input_shift: Optional[Callable[..., nn.Module]] = None
  kernel_init: Callable[..., Array] = default_kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, schedule: Schedule = None) -> Array:
    x_b = _quantized_inputs(self, x, schedule)
    w_b = _latent_kernel(self, (x.shape[-1], self.features), schedule)
    return jnp.dot(x_b, w_b)

  def effective_kernel(self, schedule: Schedule = None) -> Array:
    """The binarized kernel (use with ``apply(..., method='effective_kernel')``)."""
    return effective_kernel(self.variables["params"], self.kernel_quantizer, schedule)


class RSign(nn.Module):
  r"""ReActNet RSign: :math:`\mathrm{sign}(x + \beta_c)`, ``beta`` learned per
  channel (init 0), with the ApproxSign gradient of Bi-Real Net.

  ``shift_only=True`` returns :math:`x + \beta_c` alone, for use as a binary
  layer's ``input_shift``: the layer's ``'approx_sign'`` quantizer then
  completes RSign, and the layer sows the shifted input as ``a_F``.

  References:
    Liu et al., "ReActNet", ECCV 2020.
  """
  dtype: Any = jnp.float32
  shift_only: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    beta = self.param("beta", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    shifted = jnp.asarray(x, self.dtype) + beta.astype(self.dtype)
    return shifted if self.shift_only else binarize.approx_sign(shifted)


class RPReLU(nn.Module):
  r"""ReActNet RPReLU: :math:`\mathrm{PReLU}_c(x - \gamma_c) + \zeta_c`.

  ``gamma``, ``zeta`` init 0, the per-channel negative slope init 0.25
  (PyTorch's PReLU default).

  References:
    Liu et al., "ReActNet", ECCV 2020.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.zeros, (c,), jnp.float32)
    zeta = self.param("zeta", nn.initializers.zeros, (c,), jnp.float32)
    slope = self.param("slope", nn.initializers.constant(0.25), (c,), jnp.float32)
    x = jnp.asarray(x, self.dtype) - gamma.astype(self.dtype)
    return jnp.where(x >= 0, x, slope.astype(self.dtype) * x) + zeta.astype(self.dtype)


class ASD(nn.Module):
  r"""SD-BNN activation self-distribution: a per-sample, per-channel shift.

  .. math:: a' = a + \sigma(W_2\, \mathrm{relu}(W_1\, \mathrm{GAP}(a)))

  a squeeze-excitation branch without biases; the hidden width is
  ``max(C // reduction, 1)``. Use as ``BinaryConv(input_shift=ASD)``.

  Attributes:
    reduction: channel reduction of the hidden layer (16 CIFAR, 8 ImageNet).
    dtype: computation dtype.

  References:
    Xue et al., "Self-Distribution Binary Neural Networks", 2021.
  """
  reduction: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    pooled = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    h = nn.relu(nn.Dense(max(c // self.reduction, 1), use_bias=False,
                         dtype=self.dtype, name="fc1")(pooled))
    shift = nn.sigmoid(nn.Dense(c, use_bias=False, dtype=self.dtype, name="fc2")(h))
    shift = shift.reshape(shift.shape[:1] + (1,) * (x.ndim - 2) + shift.shape[1:])
    return jnp.asarray(x, self.dtype) + shift.astype(self.dtype)
