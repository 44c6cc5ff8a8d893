r"""Kernel gradient of each binary conv shape of the CIFAR models: XLA's
convolution gradient against one GEMM per kernel tap (:func:`taps_dw`),
timed in alternating windows in one process.

For every distinct binary conv of resnet20, vgg_small and resnet18 at batch
128 it compiles ``x, g -> dW`` both ways, checks they agree (float32
rounding), and times them window by window, A B A B, so that a change of
machine load hits both alike. The ratio ``xla_s / taps_s`` > 1 means the
per-tap GEMM is faster. Last stdout line: one JSON object.

  python bench/conv_grad.py --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# (model, H=W of the input, Cin, Cout, kernel, stride) of each distinct binary conv.
SHAPES = (
    ("resnet20", 32, 16, 16, 3, 1), ("resnet20", 32, 16, 32, 3, 2),
    ("resnet20", 16, 32, 32, 3, 1), ("resnet20", 16, 32, 64, 3, 2),
    ("resnet20", 8, 64, 64, 3, 1),
    ("vgg_small", 32, 128, 128, 3, 1), ("vgg_small", 16, 128, 256, 3, 1),
    ("vgg_small", 16, 256, 256, 3, 1), ("vgg_small", 8, 256, 512, 3, 1),
    ("vgg_small", 8, 512, 512, 3, 1),
    ("resnet18", 32, 64, 64, 3, 1), ("resnet18", 32, 64, 128, 3, 2),
    ("resnet18", 32, 64, 128, 1, 2), ("resnet18", 16, 128, 128, 3, 1),
    ("resnet18", 16, 128, 256, 3, 2), ("resnet18", 8, 256, 256, 3, 1),
    ("resnet18", 8, 256, 512, 3, 2), ("resnet18", 4, 512, 512, 3, 1),
)


def taps_dw(x, g, w_shape, strides, padding):
  """``d(sum(g * conv(x, w))) / dw`` (NHWC ``x``, HWIO ``w``, explicit
  ``((top, bottom), (left, right))`` padding) as one GEMM per kernel tap:
  ``dw[i, j] = x_ij^T g`` with ``x_ij`` the strided window of the padded
  input that tap reads, both operands in their NHWC layout."""
  import jax
  import jax.numpy as jnp
  kh, kw = w_shape[:2]
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, ho, wo, _ = g.shape
  sh, sw = strides
  rows = []
  for i in range(kh):
    row = []
    for j in range(kw):
      xs = jax.lax.slice(xp, (0, i, j, 0),
                         (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3]),
                         (1, sh, sw, 1))
      row.append(jax.lax.dot_general(xs, g, (((0, 1, 2), (0, 1, 2)), ((), ()))))
    rows.append(jnp.stack(row))
  return jnp.stack(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5, help="alternating window pairs")
  p.add_argument("--min_window_s", type=float, default=0.2)
  p.add_argument("--models", default="resnet20,vgg_small,resnet18")
  p.add_argument("--no_xla_tuning", action="store_true",
                 help="leave out cmim_jax.xla_tuning's flags (XLA defaults: YNNPACK convs)")
  args = p.parse_args(argv)

  if not args.no_xla_tuning:  # As `python -m cmim_jax.main` and bench/train_step.py run.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cmim_jax import xla_tuning
    xla_tuning.apply()
  import jax
  import jax.numpy as jnp
  import numpy as np

  rows = []
  models = args.models.split(",")
  for model, hw, cin, cout, k, s in SHAPES:
    if model not in models:
      continue
    pad = ((k // 2, k // 2),) * 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.sign(rng.standard_normal((args.batch_size, hw, hw, cin))), jnp.float32)
    w_shape = (k, k, cin, cout)
    ho = (hw + 2 * (k // 2) - k) // s + 1
    g = jnp.asarray(rng.standard_normal((args.batch_size, ho, ho, cout)), jnp.float32)

    def xla_dw(x, g):
      w = jnp.zeros(w_shape, x.dtype)
      _, vjp = jax.vjp(lambda w: jax.lax.conv_general_dilated(
          x, w, (s, s), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")), w)
      return vjp(g)[0]

    def per_tap_dw(x, g):
      return taps_dw(x, g, w_shape, (s, s), pad)

    fa, fb = jax.jit(xla_dw), jax.jit(per_tap_dw)
    a, b = np.asarray(fa(x, g)), np.asarray(fb(x, g))
    err = float(np.abs(a - b).max() / np.abs(a).max())
    if err > 1e-5:
      raise AssertionError(f"{model} {w_shape}: per-tap dW differs from XLA's by {err:.1e}")
    # Calls per window so that a window lasts about min_window_s.
    t0 = time.perf_counter()
    jax.block_until_ready(fa(x, g))
    n = max(1, int(args.min_window_s / max(time.perf_counter() - t0, 1e-4)))
    ratios, ta, tb = [], [], []
    for _ in range(args.repeats):
      for f, out in ((fa, ta), (fb, tb)):
        t0 = time.perf_counter()
        for _ in range(n):
          r = f(x, g)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / n)
      ratios.append(ta[-1] / tb[-1])
    row = {"model": model, "hw": hw, "cin": cin, "cout": cout, "k": k, "stride": s,
           "xla_ms": 1e3 * statistics.median(ta), "taps_ms": 1e3 * statistics.median(tb),
           "xla_over_taps": statistics.median(ratios), "max_rel_err": err}
    rows.append(row)
    print(f"{model:9s} {hw:2d}x{hw:<2d} {cin:3d}->{cout:3d} k{k} s{s}: xla {row['xla_ms']:7.2f} ms"
          f"  taps {row['taps_ms']:7.2f} ms  xla/taps {row['xla_over_taps']:.2f} "
          f"(windows {[round(r, 2) for r in ratios]})", flush=True)
  print(json.dumps({"batch_size": args.batch_size, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "load_avg": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
  main()
