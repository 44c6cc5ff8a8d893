"""VGG-small for CIFAR (32x32): 128-128-M-256-256-M-512-512-M.

Each conv is followed by (max pool where marked) -> BN -> hardtanh. The first
conv and the classifier are full precision, the other five convs binary.
Modules: ``conv0`` (FP) ... ``conv5``, ``bn0`` ... ``bn5``, ``fc``; the binary
convs are ``conv1`` to ``conv5``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmim_jax import layers, quantizers
from cmim_jax.models import common, registry

Array = jax.Array


class VGGSmall(nn.Module):
  """VGG-small with binary convs 1..5 and a full-precision conv0 and classifier.

  Attributes:
    num_classes: classifier outputs.
    input_quantizer: activation quantizer of every binary conv.
    kernel_quantizer: weight quantizer of every binary conv.
    input_shift: optional module factory applied before each binary conv's
      sign; it must take a ``dtype`` field (it gets the model's).
    widths: channels of conv0..conv5.
    pool_after: indices of the convs followed by a 2x2 max pool.
    bn_axis_name: axis for cross-device BatchNorm statistics.
    dtype: computation dtype (parameters stay float32; logits are float32).
  """
  num_classes: int = 10
  input_quantizer: quantizers.QuantizerLike = "ede_sign"
  kernel_quantizer: quantizers.QuantizerLike = "irnet_weight"
  input_shift: Optional[Callable[..., nn.Module]] = None
  widths: Sequence[int] = (128, 128, 256, 256, 512, 512)
  pool_after: Sequence[int] = (1, 3, 5)
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool,
               schedule: Optional[Mapping[str, Any]] = None) -> Array:
    """Logits ``f32[B, num_classes]`` of NHWC images ``x``.

    ``schedule=None`` means k = t = 1 (see ``common.resolve_schedule``).
    """
    schedule = common.resolve_schedule(schedule)
    norm = common.batch_norm(train, self.bn_axis_name, self.dtype)
    x = jnp.asarray(x, self.dtype)
    # The shift computes in the model's dtype, as in resnet.ResNet: left at
    # its own float32 default it rounded float64 inputs to float32.
    shift = (None if self.input_shift is None
             else functools.partial(self.input_shift, dtype=self.dtype))
    for i, width in enumerate(self.widths):
      if i == 0:
        x = nn.Conv(width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                    kernel_init=layers.default_kernel_init, name="conv0")(x)
      else:
        x = layers.BinaryConv(width, (3, 3), padding=1,
                              input_quantizer=self.input_quantizer,
                              kernel_quantizer=self.kernel_quantizer,
                              input_shift=shift, dtype=self.dtype,
                              name=f"conv{i}")(x, schedule)
      if i in self.pool_after:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = common.hardtanh(norm(name=f"bn{i}")(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return jnp.asarray(x, jnp.float32)


vgg_small = registry.register("vgg_small")(VGGSmall)
vgg_small_fp = registry.register("vgg_small_fp")(functools.partial(
    VGGSmall, input_quantizer="identity", kernel_quantizer="identity"))
vgg_small_sdbnn = registry.register("vgg_small_sdbnn")(functools.partial(
    VGGSmall, kernel_quantizer="wsd_weight",
    input_shift=functools.partial(layers.ASD, reduction=16)))
