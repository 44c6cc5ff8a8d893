r"""A binary network and a quantizer of your own, trained by ``cmim_jax.main``.

  PYTHONPATH=examples python -m cmim_jax.main --config configs/digits.py:smoke \
      --config.imports=my_bnn --config.model.name=tiny_bnn \
      --config.model.input_quantizer='gain_sign(gain=0.5)' --workdir runs/mine

``config.imports`` names modules the trainer imports before it builds the
model: importing this one registers ``gain_sign`` and ``tiny_bnn``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from cmim_jax import binarize, layers, models, quantizers


@quantizers.register("gain_sign")
def gain_sign(x, clip=1.0, gain=1.0):
  r"""``gain * sign(x)`` with the clipped straight-through gradient
  :math:`gain \cdot 1_{|x| \le clip}`; ``clip`` and ``gain`` are options:
  ``'gain_sign(gain=0.5)'``."""
  return gain * binarize.ste_sign(x, clip)


@models.register("tiny_bnn")
class TinyBNN(nn.Module):
  """FP stem, ``depth`` binary 3x3 convs (each followed by BN), GAP, FP classifier.

  The fields ``num_classes`` and ``bn_axis_name`` and the call signature are
  what every model provides (docs/CONTRACTS.md, Models); the binary convs sow
  the activations CMIM contrasts.
  """
  num_classes: int = 10
  input_quantizer: quantizers.QuantizerLike = "gain_sign"
  kernel_quantizer: quantizers.QuantizerLike = "xnor_weight"
  width: int = 16
  depth: int = 2
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, schedule=None):
    def norm(name):
      return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                          axis_name=self.bn_axis_name, dtype=self.dtype, name=name)

    x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype,
                kernel_init=layers.default_kernel_init, name="stem_conv")(x)
    x = norm("stem_bn")(x)
    for i in range(1, self.depth + 1):
      x = layers.BinaryConv(self.width, (3, 3), padding=1,
                            input_quantizer=self.input_quantizer,
                            kernel_quantizer=self.kernel_quantizer, dtype=self.dtype,
                            name=f"conv{i}")(x, schedule)
      x = norm(f"bn{i}")(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(jnp.mean(x, axis=(1, 2)))
    return jnp.asarray(x, jnp.float32)
