"""The packed layer program of ReActNet-A (:class:`cmim_jax.models.ReActNetA`).

Per block, in the float operations and order of the Flax model (so that the
packed eval forward matches it bit for bit)::

    s = x + beta_1                        channel_add (RSign's shift)
    y = BN_1(bconv3x3_s(s))               bconv, bn
    h = RPReLU_1(y + pool_s(x))           avg_pool (stride 2 only), add, rprelu
    s = h + beta_2                        channel_add
    x = BN_2(bconv1x1(s)) + h             bconv, bn, add          (keeping)
    x = concat(BN_21(bconv1x1_1(s)) + h,  ... twice, concat       (doubling)
               BN_22(bconv1x1_2(s)) + h)
    x = RPReLU_2(x)                       rprelu

after the FP stem (conv + BN); then global average pooling and ``fc``.
"""
from __future__ import annotations

from typing import Any

_NO_PAD = [[0, 0], [0, 0]]


def _shift(b: Any, path: str, src: str, dst: str) -> None:
  beta = b._get(b.params, path)["beta"]  # pylint: disable=protected-access
  b.add("channel_add", path, src, dst, {"bias": b.float(beta)})


def build(b: Any, m: Any) -> None:
  """Emits ReActNet-A ``m``'s program into the pack builder ``b``."""
  b.conv("stem_conv", strides=int(m.strides[0]), padding=1)
  b.bn("stem_bn")
  widths, strides = tuple(m.widths), tuple(m.strides)
  for i, (cin, cout, s) in enumerate(zip(widths[:-1], widths[1:], strides[1:]), start=1):
    n = f"block{i}"
    _shift(b, f"{n}/shift1", "x", "s")
    b.bconv(f"{n}/conv1", strides=int(s), padding=1, src="s", dst="y")
    b.bn(f"{n}/bn1", "y")
    sc = "x"
    if s == 2:
      b.op("avg_pool", f"{n}/pool", "x", "sc", window=[2, 2], strides=[2, 2], padding=_NO_PAD)
      sc = "sc"
    b.op("add", f"{n}/add1", "y", "h", src2=sc)
    b.rprelu(f"{n}/act1", "h")
    _shift(b, f"{n}/shift2", "h", "s")
    if cout == cin:
      b.bconv(f"{n}/conv2", strides=1, padding=0, src="s", dst="y")
      b.bn(f"{n}/bn2", "y")
      b.op("add", f"{n}/add2", "y", "x", src2="h")
    else:
      for j, reg in ((1, "y"), (2, "sc")):
        b.bconv(f"{n}/conv2_{j}", strides=1, padding=0, src="s", dst=reg)
        b.bn(f"{n}/bn2_{j}", reg)
        b.op("add", f"{n}/add2_{j}", reg, reg, src2="h")
      b.op("concat", f"{n}/concat", "y", "x", src2="sc")
    b.rprelu(f"{n}/act2")
  b.op("global_avg_pool", "pool")
  b.dense("fc")
