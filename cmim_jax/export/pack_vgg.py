"""The packed layer program of VGG-small (:class:`cmim_jax.models.VGGSmall`).

Per layer ``i``, in the order of the Flax model::

    x = conv0(x) (i = 0, float) or bconv_i(x)
    x = max_pool2x2(x)                    (i in pool_after)
    x = hardtanh(BN_i(x))

then ``flatten`` and ``fc``.
"""
from __future__ import annotations

from typing import Any

from cmim_jax.models import vgg


def build(b: Any, m: vgg.VGGSmall) -> None:
  """Emits VGG-small ``m``'s program into the pack builder ``b``."""
  for i, _ in enumerate(m.widths):
    if i == 0:
      b.conv("conv0", strides=1, padding=1)
    else:
      b.bconv(f"conv{i}", strides=1, padding=1)
    if i in m.pool_after:
      b.op("max_pool", f"pool{i}", window=[2, 2], strides=[2, 2], padding=[[0, 0], [0, 0]])
    b.bn(f"bn{i}")
    b.op("hardtanh", f"act{i}")
  b.op("flatten", "flatten")
  b.dense("fc")
