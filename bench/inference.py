r"""Inference speed and weight memory: packed XNOR-popcount vs the float eval forward.

For one registered model (default CIFAR ResNet-18 1w1a) it packs random
variables (speed does not depend on their values; ``--workdir`` packs a real
run instead) and measures, at each batch size:

* per binary 3x3 conv (one row per distinct shape): the packed layer, in
  pure JAX (binarize + pack the input, XNOR-popcount over uint32 words,
  border map, scale) and as the C++ XLA FFI kernel
  (:mod:`cmim_jax.export.ffi`, one call per layer) vs the float layer the
  training model runs in eval mode
  (``sign(x)`` convolved in float32 with its binarized kernel, the kernel
  quantized once outside the timing: the strongest float baseline);
* end to end: ``cmim_jax.export.load(path)``'s forward (pure JAX and with
  the FFI kernel, which also applies the BatchNorm after each conv) vs
  ``model.apply(variables, x, train=False)`` (which re-quantizes the latent
  kernels on every call, as the training model does) and vs the same model
  with its kernels quantized once (identity kernel quantizer reading the
  binarized kernels: the strongest float baseline), all jitted, the float
  variables passed as arguments, on normalised float32 images.

* per binary layer inside the whole compiled forward (batch 1 by default,
  bench/op_profile.py): each model is run under
  ``jax.profiler`` and every layer's operations (its Flax module scope in the
  float model with kernels quantized once, its ``jax.named_scope`` in the
  packed program) are summed (each operation's median over the calls), the
  float and FFI programs alternating over ``--profile_sessions`` sessions: a
  layer's cost with
  no dispatch from Python and its input made by the layer before, the
  figure the end-to-end time is made of. With the FFI kernel a layer's call
  also applies the following BatchNorm/residual/hardtanh, which the float
  model runs outside the conv's scope: the ratio understates the kernel.
  A fusion of operations from two layers counts for the layer of the
  operation XLA names it after (its root).

``--layer_calls K`` times the per-layer rows as K calls on K different
inputs inside one jitted program (reported per call): the fixed cost of
launching a program from Python is then paid once per K layers, as it is
once per model inside a compiled forward.

Timing is paired: after compilation and one warm-up call each, every round
calls every variant once, back to back, and a
speedup is the median (and quartiles) of the per-round ratios, which a
shared machine's changing load moves less than a ratio of separate medians;
times are medians over the ``--repeats`` rounds. Weight memory: float32
bytes of the binary layers' latent kernels vs their packed bits, and of all
eval variables vs the packed file's arrays. Last stdout line: one JSON
object: ``layers`` (per layer launched alone: ``float_ms``, ``packed_ms``,
``ffi_ms``, ``speedup``/``ffi_speedup`` against the float layer, with
``_iqr`` quartiles), ``end_to_end`` (per batch: ``float_ms`` the eval
forward, ``float_cached_kernels_ms``, ``packed_ms``, ``ffi_ms``, and
``ffi_speedup``, ``ffi_speedup_vs_cached``, ``ffi_vs_pure`` with quartiles),
``layers_in_model`` (per binary layer inside the forward: ``float_us``,
``cached_us``, ``ffi_us``, ``ffi_speedup`` against the eval forward,
``ffi_speedup_vs_cached``, each with ``_iqr``), ``in_model_speedup`` (min,
median, max of those over the 3x3 convs, per batch), ``memory``, and the
machine.

  python bench/inference.py                          # ResNet-18, batch 1 and 64, CPU
  python bench/inference.py --model resnet20 --batch_sizes 1,256
  python bench/inference.py --workdir runs/c10       # a trained run (uses its config)

Where the FFI kernel cannot be built (no compiler) its columns are absent
and the JSON's ``ffi`` field says why; ``CMIM_JAX_FFI_ISA=avx2`` (or
``baseline``) times that variant of it instead of the best the CPU has
(the field names the one used). Kernel-only timings of every variant,
without XLA: ``bench/bconv_micro.cc``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cmim_jax import binarize, export, layers, models  # noqa: E402
from cmim_jax.export import ffi  # noqa: E402

import op_profile  # noqa: E402  (bench/, on sys.path as the script's directory)


def random_variables(model, shape, seed=0):
  """Variables of the model's structure with random values (no compile)."""
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, *shape)))
  rng = np.random.default_rng(seed)
  def draw(path, s):
    key = jax.tree_util.keystr(path)
    if key.endswith("['var']"):
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if key.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, {k: shapes[k] for k in ("params", "batch_stats")})


def paired_times(fns, x, *, repeats):
  """Times each function on ``x``, interleaved: round r calls every function once.

  On a shared CPU the load moves between rounds; within a round the
  functions see nearly the same load, so the per-round ratios are steadier
  than a ratio of separate medians. Each function is compiled and warmed up
  first.

  Returns:
    ``{name: [seconds per round]}``.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(x))  # compile
    jax.block_until_ready(fn(x))  # warm-up
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(x))
      times[name].append(time.perf_counter() - t)
  return times


def executed_ops(jitted, *args) -> int:
  """Top-level operations of the compiled program (fusions, convolutions,
  concatenations, ...; not constants, parameters or bitcasts): on CPU each is
  dispatched separately, a fixed cost that dominates small layers at batch 1."""
  return len(op_profile.op_names(jitted, *args))


def ratio_stats(num, den):
  """Median and quartiles of the per-round ratios ``num[r] / den[r]``."""
  q = np.quantile(np.asarray(num) / np.asarray(den), [0.25, 0.5, 0.75])
  return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2])}


def bconv_inputs(program, x):
  """Input shape of every bconv layer (one eager pass at batch 1)."""
  regs, shapes = {"x": x}, {}
  for layer in program.layers:
    if layer["op"] == "bconv":
      shapes[layer["name"]] = regs[layer.get("src", "x")].shape
    regs[layer.get("dst", "x")] = jax.eval_shape(
        lambda r, l=layer: program.run_layer(l, r), regs)
    regs = {k: jnp.zeros(v.shape, v.dtype) if isinstance(v, jax.ShapeDtypeStruct) else v
            for k, v in regs.items()}
  return shapes


def layers_in_model(runs, bconvs, shapes, batch, rounds, sessions):
  """Per binary layer, the time of its operations inside each whole compiled
  forward (bench/op_profile.py): ``runs`` maps a variant name to (jitted,
  *args). A layer's operations are those under its scope: in the float
  models the Flax module's (the input's sign and the convolution, and in
  the eval forward ``float`` the kernel's quantization too, as it runs
  there on every call; ``cached``: the kernels quantized once), in the
  packed program the layer's ``jax.named_scope`` (with the FFI kernel: the
  one call, which also applies the BatchNorm, residual and hardtanh that
  follow; the float model runs those outside the conv's scope, so the
  ratio understates the kernel). Paired like the wall-clock rows:
  ``sessions`` profiler sessions of ``rounds`` calls per variant, the
  variants alternating, a layer's ratio the median of the per-session ratios.

  Returns:
    one row per binary layer; prints one line each.
  """
  names = [l["name"] for l in bconvs]
  ops = {k: op_profile.op_names(f, *a) for k, (f, *a) in runs.items()}
  per = {k: [] for k in runs}  # per session: {scope: seconds}
  for _ in range(sessions):
    for k, (f, *a) in runs.items():
      per[k].append(op_profile.scope_times(
          op_profile.op_times(f, *a, rounds=rounds, names=ops[k]), names))
  med = {k: {n: statistics.median(t[n] for t in ts) for n in [*names, "total"]}
         for k, ts in per.items()}
  # A layer whose scope matched no operation in some program (a naming
  # mismatch) gets no ratio, and says so, rather than a 0 or an inf.
  missing = {n: [k for k, ts in per.items() if any(t[n] <= 0 for t in ts)] for n in names}
  for n, ks in missing.items():
    if ks:
      print(f"    warning: no operation under scope {n!r} in the profile of {', '.join(ks)}; "
            "no ratio for it", file=sys.stderr)
  totals = "  ".join(f"{k} {t['total'] * 1e3:.3f} ms" for k, t in med.items())
  print(f"  inside the forward, batch {batch} ({sessions} x {rounds} calls each; sum of the "
        f"profiled operations: {totals}):")
  rows = []
  for layer in bconvs:
    n = layer["name"]
    row = {"layer": n, "batch": batch, "input": list(shapes[n][1:]), "cout": layer["cout"],
           "kernel": list(layer["kernel"]), "strides": list(layer["strides"])}
    line = f"    {n:28s} {str(row['input']):15s} -> {layer['cout']:4d}"
    for k in runs:
      row[f"{k}_us"] = med[k][n] * 1e6
      line += f"  {k} {med[k][n] * 1e6:7.1f} us"
    if "ffi" in runs and not missing[n]:
      for base, key in (("float", "ffi_speedup"), ("cached", "ffi_speedup_vs_cached")):
        r = ratio_stats([t[n] for t in per[base]], [t[n] for t in per["ffi"]])
        row[key], row[f"{key}_iqr"] = r["median"], [r["q25"], r["q75"]]
        line += f"  vs {base} {r['median']:5.2f}x ({r['q25']:.2f}-{r['q75']:.2f})"
    rows.append(row)
    print(line, flush=True)
  return rows


def in_model_summary(rows):
  """Min/median/max of the FFI kernel's speedups over the binary 3x3 convs, per batch."""
  out = {}
  for r in rows:
    if r["kernel"] == [3, 3] and "ffi_speedup" in r:
      for key in ("ffi_speedup", "ffi_speedup_vs_cached"):
        out.setdefault(str(r["batch"]), {}).setdefault(key, []).append(r[key])
  return {b: {k: {"min": min(v), "median": statistics.median(v), "max": max(v)}
              for k, v in d.items()} for b, d in out.items()}


def _repeated(fns, k):
  """``fns`` as programs that call each one ``k`` times on ``k`` stacked inputs.

  The inputs differ, so XLA can neither hoist nor merge the calls; every
  output is returned, so none is dropped.
  """
  if k == 1:
    return fns
  return {name: jax.jit(lambda xs, f=f: tuple(f(xs[i]) for i in range(k)))
          for name, f in fns.items()}


def _inputs(rng, x, k):
  """``x`` for one call, or ``k`` inputs of its shape stacked (``x`` first)."""
  if k == 1:
    return x
  more = rng.normal(size=(k - 1, *x.shape)).astype(np.float32)
  return jnp.concatenate([x[None], jnp.asarray(more)])


def _params_at(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="resnet18")
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--image_shape", default="32,32,3")
  p.add_argument("--batch_sizes", default="1,64")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--workdir", default=None, help="pack this run instead of random variables")
  p.add_argument("--no_layers", action="store_true", help="end to end only")
  p.add_argument("--layer_calls", type=int, default=1,
                 help="per-layer rows: K > 1 times K calls of the layer on K different inputs "
                      "inside one jitted program (per-call time = program time / K), so the "
                      "fixed cost of dispatching a program from Python is paid once, as inside "
                      "a compiled model; 1 times one call per program")
  p.add_argument("--profile_sessions", type=int, default=5,
                 help="per binary layer inside the compiled forward: this many jax.profiler "
                      "sessions per model, alternating (0: skip)")
  p.add_argument("--profile_rounds", type=int, default=10,
                 help="calls of the whole model per profiler session")
  p.add_argument("--profile_batches", default="1",
                 help="batch sizes to profile per layer (at batch 1 each operation runs on "
                      "one thread, start to end inside its profiled span)")
  args = p.parse_args()

  if args.workdir:
    config = export.load_run_config(args.workdir)
    variables, _ = export.restore_variables(args.workdir)
    num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
    model = export.build_model(config, num_classes)
    shape, mean, std = export.data_facts(config)
    name = config.model.name
  else:
    name = args.model
    model = models.get_model(name, num_classes=args.num_classes)
    shape = tuple(int(v) for v in args.image_shape.split(","))
    variables = random_variables(model, shape)
    mean, std = (0.5,) * shape[-1], (0.25,) * shape[-1]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "m.cmimbnn")
    result = export.save(path, model, variables, model_name=name, input_shape=shape,
                         mean=mean, std=std)
    packed = export.load(path, kernel="pure")
  program = packed.program
  ffi_status = ffi.status()
  ffi_program = packed.with_kernel("ffi").program if ffi.available() else None
  print(f"C++ FFI kernel: {ffi_status}")
  bconvs = [l for l in program.layers if l["op"] == "bconv"]
  latent = sum(4 * np.size(_params_at(variables["params"], l["name"])["kernel"]) for l in bconvs)
  bits = sum(program.arrays[f"{l['name']}/bits"].nbytes for l in bconvs)
  memory = {"binary_kernels_float_bytes": int(latent), "binary_kernels_packed_bytes": int(bits),
            "binary_kernels_ratio": latent / bits, "model_float_bytes": result.float_bytes,
            "model_packed_bytes": result.packed_bytes,
            "model_ratio": result.float_bytes / result.packed_bytes,
            "file_bytes": result.file_bytes}
  mib = 1 << 20
  print(f"{name}: binary kernels {latent / mib:.2f} MiB float32 -> {bits / mib:.3f} MiB packed "
        f"({latent / bits:.1f}x); whole model {result.float_bytes / mib:.2f} MiB -> "
        f"{result.packed_bytes / mib:.2f} MiB ({memory['model_ratio']:.1f}x); file "
        f"{result.file_bytes / mib:.2f} MiB")

  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  rng = np.random.default_rng(0)
  layer_rows, e2e_rows, in_model_rows = [], [], []
  shapes = bconv_inputs(program, jnp.zeros((1, *shape), jnp.float32))
  seen = set()
  for layer in bconvs:
    if args.no_layers or layer["kernel"] != [3, 3]:
      continue
    in_shape = shapes[layer["name"]]
    key = (tuple(in_shape[1:]), layer["cout"], tuple(layer["strides"]))
    if key in seen:
      continue
    seen.add(key)
    lp = _params_at(variables["params"], layer["name"])
    w_b = jax.jit(lambda p: layers.effective_kernel(
        {k: v for k, v in p.items() if k != "input_shift"}, model.kernel_quantizer,
        binarize.DEFAULT_SCHEDULE))(lp)
    strides, padding = tuple(layer["strides"]), tuple(tuple(q) for q in layer["padding"])
    def float_layer(x, w_b=w_b, strides=strides, padding=padding):
      x_b = jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)  # binarize.sign
      return jax.lax.conv_general_dilated(x_b, w_b, strides, padding,
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    packed_layer = lambda x, layer=layer: program.run_layer(layer, {layer["src"]: x})
    ffi_layer = lambda x, layer=layer: ffi.run_group(ffi_program, [layer], {layer["src"]: x})
    for b in batch_sizes:
      x = jnp.asarray(rng.normal(size=(b, *in_shape[1:])).astype(np.float32))
      fns = {"float": jax.jit(float_layer), "packed": jax.jit(packed_layer)}
      if ffi_program is not None:
        fns["ffi"] = jax.jit(ffi_layer)
      # The layer itself must agree before its speed means anything.
      # (w_b carries the scale alpha already: no second factor.)
      np.testing.assert_allclose(np.asarray(fns["packed"](x)), np.asarray(fns["float"](x)),
                                 rtol=1e-5, atol=1e-4)
      if "ffi" in fns:
        np.testing.assert_array_equal(np.asarray(fns["ffi"](x)), np.asarray(fns["packed"](x)))
      t = paired_times(_repeated(fns, args.layer_calls),
                       _inputs(rng, x, args.layer_calls), repeats=args.repeats)
      t = {k: [v / args.layer_calls for v in vs] for k, vs in t.items()}
      tf, tp = statistics.median(t["float"]), statistics.median(t["packed"])
      sp = ratio_stats(t["float"], t["packed"])
      row = {"layer": layer["name"], "input": list(in_shape[1:]), "cout": layer["cout"],
             "strides": layer["strides"], "batch": b, "float_ms": tf * 1e3,
             "packed_ms": tp * 1e3, "speedup": sp["median"],
             "speedup_iqr": [sp["q25"], sp["q75"]]}
      line = (f"  {layer['name']:24s} in {'x'.join(map(str, in_shape[1:])):>10s} -> "
              f"{layer['cout']:4d} s{layer['strides'][0]} batch {b:4d}: float {tf * 1e3:8.3f} ms  "
              f"pure {tp * 1e3:8.3f} ms {sp['median']:5.2f}x ({sp['q25']:.2f}-{sp['q75']:.2f})")
      if "ffi" in fns:
        ti = statistics.median(t["ffi"])
        si, sv = ratio_stats(t["float"], t["ffi"]), ratio_stats(t["packed"], t["ffi"])
        row.update({"ffi_ms": ti * 1e3, "ffi_speedup": si["median"],
                    "ffi_speedup_iqr": [si["q25"], si["q75"]], "ffi_vs_pure": sv["median"],
                    "ffi_vs_pure_iqr": [sv["q25"], sv["q75"]]})
        line += (f"  ffi {ti * 1e3:8.3f} ms {si['median']:5.2f}x ({si['q25']:.2f}-{si['q75']:.2f}; "
                 f"vs pure {sv['median']:.2f}x)")
      layer_rows.append(row)
      print(line, flush=True)

  v = {k: variables[k] for k in ("params", "batch_stats")}
  # The variables are arguments, as in training (closed over, XLA would fold
  # the kernel quantization into constants at compile time, slowly).
  float_apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  v_dev = jax.device_put(v)  # on the device once, not copied on every call
  float_fn = lambda x: float_apply(v_dev, x)
  # A float deployment would quantize the kernels once: the same model with
  # identity kernel quantizers reading the binarized kernels.
  cached = jax.tree.map(np.asarray, v)
  for layer in bconvs:
    node = _params_at(cached["params"], layer["name"])
    node["kernel"] = np.asarray(jax.jit(lambda p: layers.effective_kernel(
        {k: x for k, x in p.items() if k != "input_shift"}, model.kernel_quantizer,
        binarize.DEFAULT_SCHEDULE))(_params_at(v["params"], layer["name"])))
  cached_model = model.clone(kernel_quantizer="identity")
  cached_apply = jax.jit(lambda v, x: cached_model.apply(v, x, train=False))
  cached_dev = jax.device_put(cached)
  cached_fn = lambda x: cached_apply(cached_dev, x)
  packed_fn = jax.jit(program.forward)
  ffi_fn = None if ffi_program is None else jax.jit(ffi_program.forward)
  for b in batch_sizes:
    x = jnp.asarray(rng.normal(size=(b, *shape)).astype(np.float32))
    r = np.asarray(float_fn(x)), np.asarray(packed_fn(x))
    agree = float(np.mean(r[0].argmax(-1) == r[1].argmax(-1)))
    np.testing.assert_allclose(np.asarray(cached_fn(x)), r[0], rtol=1e-4, atol=1e-4)
    fns = {"float": float_fn, "cached": cached_fn, "packed": packed_fn}
    if ffi_fn is not None:
      np.testing.assert_array_equal(np.asarray(ffi_fn(x)), r[1])  # bit for bit
      fns["ffi"] = ffi_fn
    t = paired_times(fns, x, repeats=args.repeats)
    tf, tc, tp = (statistics.median(t[k]) for k in ("float", "cached", "packed"))
    sp, spc = ratio_stats(t["float"], t["packed"]), ratio_stats(t["cached"], t["packed"])
    ops = {"float": executed_ops(float_apply, v_dev, x),
           "cached": executed_ops(cached_apply, cached_dev, x),
           "packed": executed_ops(packed_fn, x)}
    row = {"batch": b, "executed_ops": ops,
                     "float_ms": tf * 1e3, "float_cached_kernels_ms": tc * 1e3,
                     "packed_ms": tp * 1e3, "speedup": sp["median"],
                     "speedup_iqr": [sp["q25"], sp["q75"]], "speedup_vs_cached": spc["median"],
                     "speedup_vs_cached_iqr": [spc["q25"], spc["q75"]],
                     "argmax_agree": agree, "max_abs_diff": float(np.max(np.abs(r[0] - r[1])))}
    print(f"  end to end batch {b:4d}: float {tf * 1e3:8.3f} ms (kernels quantized once: "
          f"{tc * 1e3:8.3f} ms)  pure {tp * 1e3:8.3f} ms  {sp['median']:5.2f}x "
          f"({sp['q25']:.2f}-{sp['q75']:.2f}; vs cached {spc['median']:5.2f}x)  "
          f"(argmax agree {agree:.3f}; compiled ops: float {ops['float']}, cached "
          f"{ops['cached']}, pure {ops['packed']})", flush=True)
    if ffi_fn is not None:
      ti = statistics.median(t["ffi"])
      si, sc, sv = (ratio_stats(t[k], t["ffi"]) for k in ("float", "cached", "packed"))
      ops["ffi"] = executed_ops(ffi_fn, x)
      row.update({"ffi_ms": ti * 1e3, "ffi_speedup": si["median"],
                  "ffi_speedup_iqr": [si["q25"], si["q75"]], "ffi_speedup_vs_cached": sc["median"],
                  "ffi_speedup_vs_cached_iqr": [sc["q25"], sc["q75"]],
                  "ffi_vs_pure": sv["median"], "ffi_vs_pure_iqr": [sv["q25"], sv["q75"]]})
      print(f"  end to end batch {b:4d}: ffi {ti * 1e3:8.3f} ms  {si['median']:5.2f}x "
            f"({si['q25']:.2f}-{si['q75']:.2f}); vs cached {sc['median']:5.2f}x "
            f"({sc['q25']:.2f}-{sc['q75']:.2f}); vs pure {sv['median']:5.2f}x "
            f"({sv['q25']:.2f}-{sv['q75']:.2f}); compiled ops {ops['ffi']}", flush=True)
    e2e_rows.append(row)
    if args.profile_sessions > 0 and str(b) in args.profile_batches.split(","):
      runs = {"float": (float_apply, v_dev, x), "cached": (cached_apply, cached_dev, x)}
      if ffi_fn is not None:
        runs["ffi"] = (ffi_fn, x)
      in_model_rows += layers_in_model(runs, bconvs, shapes, b, args.profile_rounds,
                                       args.profile_sessions)

  by_batch = {}
  for b in batch_sizes:
    rows = [r for r in layer_rows if r["batch"] == b]
    if rows:
      by_batch[str(b)] = {"min": min(r["speedup"] for r in rows),
                          "median": statistics.median(r["speedup"] for r in rows),
                          "max": max(r["speedup"] for r in rows)}
      if all("ffi_speedup" in r for r in rows):
        by_batch[str(b)]["ffi"] = {"min": min(r["ffi_speedup"] for r in rows),
                                   "median": statistics.median(r["ffi_speedup"] for r in rows),
                                   "max": max(r["ffi_speedup"] for r in rows)}
  print(json.dumps({
      "model": name, "input_shape": list(shape), "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
      "machine": platform.machine(), "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      "ffi": ffi_status, "memory": memory, "layer_calls": args.layer_calls,
      "layers": layer_rows, "layer_speedup": by_batch,
      "end_to_end": e2e_rows, "layers_in_model": in_model_rows,
      "in_model_speedup": in_model_summary(in_model_rows)}))


if __name__ == "__main__":
  main()
