r"""Is the PyTorch twin (``bench/torch_bnn.py``) the same BNN as the JAX model?

For each model the JAX model's variables (its own init, with the BatchNorm
scales, biases and running statistics drawn at random so that none of them is
a neutral 1 or 0) are copied into the twin with
``torch_bnn.load_flax_variables``, and both are run on the same random batch
with the same EDE ``(k, t)``:

* logits in train mode (batch statistics) and in eval mode (running ones);
* gradients of the mean cross entropy (train mode) with respect to every
  parameter and to the input images.

Everything runs in float64 on both sides (this script turns on
``jax_enable_x64``): a binary network amplifies float32 rounding into flipped
signs, which would make a correct twin look wrong. The JAX models still
return float32 logits, so the errors reported are at float32 rounding level.
A quantity passes when ``max|jax - torch| <= rtol * max|torch|``.

  python bench/twin_parity.py                      # resnet20, vgg_small, resnet18
  python bench/twin_parity.py --models resnet20

Last stdout line: one JSON object ``{"ok": bool, "models": {name: report}}``;
exit status 1 when a model fails.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MODELS = ("resnet20", "vgg_small", "resnet18")
# The twin hard-codes IR-Net's quantizers; the JAX default config uses the
# models' defaults ('' in configs/default.py), which must be these.
TWIN_QUANTIZERS = ("ede_sign", "irnet_weight")
RTOL = 1e-5  # float32 logits: ~1e-7 relative rounding, a wrong layer is >1e-2.
PROGRESS, T_MIN, T_MAX = 0.5, 1e-2, 10.0  # Any EDE (k, t); configs/default.py's range.


def _random_variables(shapes, rng):
  """``params`` and ``batch_stats`` of the shapes in ``shapes`` drawn with numpy.

  Kernels are He-normal (as the models' own init); BN scales, biases and
  running statistics are random too, so that none is a neutral 1 or 0 that
  would hide a misplaced tensor. Drawing them here spares compiling the init.
  """
  import jax
  import numpy as np

  def draw(path, x):
    leaf = path[-1].key
    if leaf == "kernel":
      return rng.normal(0.0, np.sqrt(2.0 / np.prod(x.shape[:-1])), x.shape)
    if leaf == "scale":
      return rng.uniform(0.5, 1.5, x.shape)
    if leaf == "var":
      return rng.uniform(0.5, 2.0, x.shape)
    return rng.normal(0.0, 0.2, x.shape)  # bias, mean
  return {c: jax.tree_util.tree_map_with_path(draw, shapes[c])
          for c in ("params", "batch_stats")}


def _error(a, b) -> dict:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
  scale = float(np.max(np.abs(b))) if b.size else 0.0
  err = float(np.max(np.abs(a - b))) if a.size else 0.0
  return {"max_abs": err, "max_ref": scale, "rel": err / scale if scale > 0 else err}


@functools.lru_cache(maxsize=None)
def jax_reference(name: str, batch_size: int = 8, seed: int = 0) -> dict:
  """The JAX side of :func:`check`, as numpy arrays (cached: a check of a
  corrupted twin reuses it). Needs ``jax_enable_x64``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from cmim_jax import binarize, models  # pylint: disable=g-import-not-at-top

  if not jax.config.jax_enable_x64:
    raise RuntimeError("twin parity runs in float64: set jax_enable_x64 before JAX starts "
                       "(run bench/twin_parity.py, which does, or use "
                       "`with jax.enable_x64(True):`)")
  model = models.get_model(name, num_classes=10, dtype=jnp.float64)
  quantizers = (model.input_quantizer, model.kernel_quantizer)
  if quantizers != TWIN_QUANTIZERS:
    raise ValueError(f"{name}: JAX quantizers {quantizers} are not the twin's {TWIN_QUANTIZERS}")
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch_size, 32, 32, 3))
  labels = rng.integers(0, 10, batch_size)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3), jnp.float64), train=False))
  variables = _random_variables(shapes, rng)
  k, t = binarize.ede_schedule(PROGRESS, t_min=T_MIN, t_max=T_MAX)
  k, t = float(k), float(t)
  schedule = {"k": jnp.float64(k), "t": jnp.float64(t)}

  def loss_fn(params, images):
    logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  images, train=True, schedule=schedule,
                                  mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels))
    return loss.mean(), (logits, updates["batch_stats"])

  @jax.jit
  def both(variables, images):  # One compilation for train and eval.
    out = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        variables["params"], images)
    return out, model.apply(variables, images, train=False)

  ((_, (logits_train, new_stats)), (g_params, g_input)), logits_eval = both(
      variables, jnp.asarray(x))
  to_np = lambda tree: jax.tree.map(np.asarray, tree)
  return {"x": x, "labels": labels, "k": k, "t": t, "variables": to_np(variables),
          "logits_train": np.asarray(logits_train), "logits_eval": np.asarray(logits_eval),
          "grad_params": to_np(g_params), "grad_input": np.asarray(g_input),
          "new_stats": to_np(new_stats)}


def check(name: str, *, batch_size: int = 8, seed: int = 0, rtol: float = RTOL,
          corrupt: str | None = None) -> dict:
  """Compares the JAX model ``name`` with its twin; see the module docstring.

  Needs ``jax_enable_x64`` (set before JAX creates any array, or inside
  ``with jax.enable_x64(True):``).

  Args:
    name: a model of ``torch_bnn.MODELS``.
    batch_size: images in the random batch.
    seed: seeds init, the BN draws, the batch and the labels.
    rtol: tolerance relative to the largest torch value of each quantity.
    corrupt: for testing the check itself: the torch parameter name (e.g.
      ``'fc.weight'``) to negate after loading, so that the check must fail.

  Returns:
    ``{"ok", "max_rel", "worst", "errors": {quantity: {max_abs, max_ref, rel}},
    ...}``; quantities are ``logits_train``, ``logits_eval``, ``grad_input``,
    ``grad/<torch parameter>`` and ``stats/<torch running_mean>``.
  """
  import numpy as np
  import torch
  import torch.nn.functional as F

  sys.path.insert(0, HERE)
  import torch_bnn  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  ref = jax_reference(name, batch_size, seed)
  twin = torch_bnn.get_model(name, 10).double()
  torch_bnn.load_flax_variables(twin, ref["variables"])
  if corrupt:
    with torch.no_grad():
      dict(twin.named_parameters())[corrupt].neg_()
  twin.set_schedule(ref["k"], ref["t"])
  x_t = torch.from_numpy(ref["x"]).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  twin.eval()  # First: a train-mode forward moves the running statistics.
  with torch.no_grad():
    t_logits_eval = twin(x_t)
  twin.train()
  t_logits_train = twin(x_t)
  F.cross_entropy(t_logits_train, torch.from_numpy(ref["labels"])).backward()

  errors = {
      "logits_train": _error(ref["logits_train"], t_logits_train.detach().numpy()),
      "logits_eval": _error(ref["logits_eval"], t_logits_eval.numpy()),
      "grad_input": _error(np.transpose(ref["grad_input"], (0, 3, 1, 2)), x_t.grad.numpy()),
  }
  # Running means move alike (torch momentum 0.1 is Flax's 0.9). Running
  # variances do not: torch stores the unbiased batch variance, Flax the biased.
  buffers = dict(twin.named_buffers())
  for bname, value in torch_bnn.torch_layout(twin, ref["new_stats"], "batch_stats").items():
    if bname.endswith("running_mean"):
      errors[f"stats/{bname}"] = _error(value.numpy(), buffers[bname].numpy())
  torch_params = dict(twin.named_parameters())
  for pname, g in torch_bnn.torch_layout(twin, ref["grad_params"]).items():
    errors[f"grad/{pname}"] = _error(g.numpy(), torch_params[pname].grad.numpy())
  if set(torch_params) != {p[len("grad/"):] for p in errors if p.startswith("grad/")}:
    raise AssertionError(f"{name}: gradients of some torch parameters were not compared")
  max_rel = max(e["rel"] for e in errors.values())
  worst = max(errors, key=lambda q: errors[q]["rel"])
  return {"ok": bool(max_rel <= rtol), "max_rel": max_rel, "worst": worst, "rtol": rtol,
          "dtype": "float64", "batch_size": batch_size, "k": ref["k"], "t": ref["t"],
          "num_params": torch_bnn.num_params(twin),
          "max_abs_logits": max(errors["logits_train"]["max_abs"],
                                errors["logits_eval"]["max_abs"]),
          "max_rel_grad_params": max(e["rel"] for q, e in errors.items()
                                     if q.startswith("grad/")),
          "max_rel_grad_input": errors["grad_input"]["rel"],
          "seconds": time.perf_counter() - start, "errors": errors}


def run(models=MODELS, *, timeout: float = 900.0, extra_args=()) -> dict:
  """Runs this script in a fresh float64 CPU process; returns its JSON report.

  Callers (``bench/train_step.py``, the tests) use this so that their own
  process keeps JAX's default float32.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
  env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--models",
                         ",".join(models), *extra_args],
                        env=env, capture_output=True, text=True, timeout=timeout)
  lines = proc.stdout.strip().splitlines()
  try:
    return json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError):
    raise RuntimeError(f"twin parity did not report (exit {proc.returncode}):\n"
                       f"{proc.stderr[-4000:]}") from None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rtol", type=float, default=RTOL)
  p.add_argument("--corrupt", default=None, help=argparse.SUPPRESS)
  p.add_argument("--verbose", action="store_true", help="per-parameter errors in the JSON")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_x64", True)
  sys.path.insert(0, REPO)
  report = {"ok": True, "models": {}}
  for name in [m for m in args.models.split(",") if m]:
    r = check(name, batch_size=args.batch_size, seed=args.seed, rtol=args.rtol,
              corrupt=args.corrupt)
    print(f"{name:9s} {'ok  ' if r['ok'] else 'FAIL'} max rel error {r['max_rel']:.2e} "
          f"({r['worst']}), logits max abs {r['max_abs_logits']:.2e}, "
          f"{r['seconds']:.1f} s", flush=True)
    if not args.verbose:
      r.pop("errors")
    report["models"][name] = r
    report["ok"] &= r["ok"]
  print(json.dumps(report))
  if not report["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  main()
