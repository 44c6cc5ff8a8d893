r"""Training-step throughput and memory: cmim_jax (base BNN, BNN + CMIM) vs PyTorch.

For each model (CIFAR ResNet-20 / VGG-small / ResNet-18, 1w1a, IR-Net quantizers) at a
global batch of random 32x32x3 images it measures, each case in its own
process (so that peak RSS belongs to that case alone):

* ``jax_base``: the real ``cmim_jax.train.train_step`` (``cmim.weight=0``)
  under ``Parallel('shard_map')`` on one device;
* ``jax_cmim``: the same with CMIM (weight 3.2, taps ``last:3``, embed 128);
* ``torch``: the same BNN in PyTorch (``bench/torch_bnn.py``), SGD momentum,
  cross entropy. Before anything is timed, ``bench/twin_parity.py`` shows
  that the twin, given the JAX model's weights, computes the same logits and
  gradients; if it does not, nothing is timed.

Throughput is images/s over ``--repeats`` timed windows of ``--steps`` steps
after compilation and warm-up (median reported; each window ends with a
``block_until_ready``/``synchronize``). Memory: process peak RSS (ru_maxrss,
includes XLA compilation), the highest RSS sampled during the timed windows,
both as deltas from the RSS after imports; XLA's compiled temp buffer size;
on GPU the allocator peaks. A fourth case, ``jax_pair``, runs base and CMIM in
one process in alternating windows: ``cmim_overhead_interleaved`` is the ratio
least disturbed by other load on a shared machine. Last stdout line: one JSON
object.

  python bench/train_step.py                       # all three models, CPU
  python bench/train_step.py --models resnet20 --steps 3 --repeats 2
  python bench/train_step.py --xla_flags=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("jax_base", "jax_cmim", "torch", "jax_pair")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
# The torch twin's EDE (k, t); the JAX step takes its own from state.step. Any
# values do: they change gradient values, not the work.
SCHEDULE_PROGRESS = 0.5


# ------------------------------------------------------------------ memory


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
  """Highest current RSS seen while running (the timed, steady-state windows)."""

  def __init__(self, interval_s: float = 0.005):
    self.interval_s, self.peak_mb = interval_s, 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak_mb = max(self.peak_mb, _current_rss_mb())
      time.sleep(self.interval_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak_mb = max(self.peak_mb, _current_rss_mb())


def _time_windows(run_steps, sync, *, steps: int, repeats: int, batch_size: int):
  """Images/s of each of ``repeats`` windows of ``steps`` steps."""
  rates = []
  for _ in range(repeats):
    sync()
    start = time.perf_counter()
    run_steps(steps)
    sync()
    rates.append(steps * batch_size / (time.perf_counter() - start))
  return rates


# ------------------------------------------------------------------ cases


def build_jax(args, cmim: bool) -> dict:
  """The real cmim_jax step, compiled and warmed up, with ``run_steps``/``sync``."""
  import functools

  import jax
  import numpy as np

  sys.path.insert(0, REPO)
  from cmim_jax import input_pipeline, train
  from cmim_jax.parallel import Parallel
  from cmim_jax import default_config

  config = default_config.get_config()
  config.model.name = args.model
  config.batch_size = args.batch_size
  config.data.augment = "none"
  config.optimizer, config.learning_rate, config.momentum = "sgd", 0.1, 0.9
  config.weight_decay = 1e-4
  config.cmim.weight = 3.2 if cmim else 0.0
  config.cmim.layers, config.cmim.embed_dim = "last:3", 128
  info = input_pipeline.DatasetInfo(
      name="random", source="random", num_classes=NUM_CLASSES, image_shape=(32, 32, 3),
      num_train=50000, num_eval=0, mean=CIFAR10_MEAN, std=CIFAR10_STD, augment="none",
      crop_padding=0)
  par = Parallel("shard_map")
  par.check_batch_size(args.batch_size)

  task = train.build_task(config, info, total_steps=100000, steps_per_epoch=390)
  state = jax.jit(functools.partial(train.init_state, task),
                  out_shardings=par.replicated)(jax.random.PRNGKey(0))
  step = train.make_steps(task, par, donate_state=True).train
  rng = np.random.default_rng(0)
  batch = par.batch_input({
      "image": rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8),
      "label": rng.integers(0, NUM_CLASSES, (args.batch_size,), dtype=np.int32)})

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  holder = {"state": state}

  def run_steps(n):
    s = holder["state"]
    for _ in range(n):
      s, metrics = compiled(s, batch)
    holder["state"], holder["metrics"] = s, metrics

  def sync():
    jax.block_until_ready(holder)

  def final_loss():
    loss = float(holder["metrics"]["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"{args.model} jax loss is {loss}")
    return loss

  run_steps(max(args.warmup, 1))
  sync()
  meta = {
      "framework": "jax",
      "num_params": sum(int(x.size) for x in jax.tree.leaves(holder["state"].params["model"])),
      "objective_params": sum(int(x.size) for x in jax.tree.leaves(
          holder["state"].params["objectives"])),
      "objectives": [t.name for t in task.objectives],
      "cmim_layers": [list(t.objective.layers) for t in task.objectives if t.name == "cmim"],
      "compile_s": compile_s,
      "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None,
      "device": str(jax.devices()[0]), "device_count": jax.device_count(),
  }
  return {"run_steps": run_steps, "sync": sync, "final_loss": final_loss, "meta": meta,
          "compiled": compiled}


def _import_jax_stack():
  sys.path.insert(0, REPO)
  import jax
  from cmim_jax import train  # noqa: F401  (imports flax, optax, the data stack)
  from cmim_jax import default_config  # noqa: F401
  return jax


def run_jax(args, cmim: bool) -> dict:
  jax = _import_jax_stack()
  base_rss = _current_rss_mb()
  case = build_jax(args, cmim)
  with RssSampler() as sampler:
    rates = _time_windows(case["run_steps"], case["sync"], steps=args.steps,
                          repeats=args.repeats, batch_size=args.batch_size)
  out = dict(case["meta"], images_per_s=statistics.median(rates), window_rates=rates,
             loss=case["final_loss"](), **_rss_report(base_rss, sampler))
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
  return out


def run_jax_pair(args) -> dict:
  """Base and CMIM steps in one process, timed in alternating windows, so that
  a change of machine load hits both sides of the ratio alike."""
  base, cmim = build_jax(args, False), build_jax(args, True)
  ratios = []
  for _ in range(args.repeats):
    rate_b, = _time_windows(base["run_steps"], base["sync"], steps=args.steps, repeats=1,
                            batch_size=args.batch_size)
    rate_c, = _time_windows(cmim["run_steps"], cmim["sync"], steps=args.steps, repeats=1,
                            batch_size=args.batch_size)
    ratios.append(rate_b / rate_c)
  base["final_loss"](), cmim["final_loss"]()
  return {"framework": "jax", "cmim_overhead": statistics.median(ratios),
          "window_ratios": ratios, "num_params": base["meta"]["num_params"],
          "images_per_s": None, "window_rates": []}


def _rss_report(base_rss: float, sampler: RssSampler) -> dict:
  peak = _maxrss_mb()
  return {"base_rss_mb": base_rss, "peak_rss_mb": peak, "peak_rss_delta_mb": peak - base_rss,
          "steady_rss_delta_mb": sampler.peak_mb - base_rss}


def run_torch(args) -> dict:
  import torch
  import torch.nn.functional as F

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_bnn

  base_rss = _current_rss_mb()
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  device = torch.device("cuda" if args.device == "gpu" else "cpu")
  memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format
  model = torch_bnn.get_model(args.model, NUM_CLASSES).to(device, memory_format=memory_format)
  import numpy as np
  k, t = torch_bnn.ede_schedule(SCHEDULE_PROGRESS, t_min=1e-2, t_max=10.0)
  model.set_schedule(k, t)
  model.train()
  # Weight decay on conv/linear weights only, as cmim_jax's decay_kernels_only.
  decay = [p for n, p in model.named_parameters() if p.ndim > 1]
  no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                         {"params": no_decay, "weight_decay": 0.0}], lr=0.1, momentum=0.9)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100000)
  gen = np.random.default_rng(0)
  images = torch.from_numpy(
      gen.integers(0, 256, (args.batch_size, 3, 32, 32), dtype=np.uint8)).to(device)
  labels = torch.from_numpy(
      gen.integers(0, NUM_CLASSES, (args.batch_size,)).astype(np.int64)).to(device)
  mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
  holder = {}

  def run_steps(n):
    for _ in range(n):
      x = ((images.float() / 255.0 - mean) / std).contiguous(memory_format=memory_format)
      logits = model(x)
      loss = F.cross_entropy(logits, labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      sched.step()
      holder["loss"] = loss.detach()

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  run_steps(args.warmup)
  sync()
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  with RssSampler() as sampler:
    rates = _time_windows(run_steps, sync, steps=args.steps, repeats=args.repeats,
                          batch_size=args.batch_size)
  loss = float(holder["loss"])
  out = {
      "framework": "torch", "images_per_s": statistics.median(rates), "window_rates": rates,
      "num_params": torch_bnn.num_params(model), "loss": loss,
      **_rss_report(base_rss, sampler),
      "threads": torch.get_num_threads(), "device": str(device),
      "channels_last": bool(args.torch_channels_last),
  }
  if device.type == "cuda":
    out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return out


# ------------------------------------------------------------------ driver


def _child_env(args) -> dict:
  env = dict(os.environ)
  # One device: drop any simulated CPU device count inherited from tests.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags += args.xla_flags.split()
  if not args.no_xla_tuning:  # What `python -m cmim_jax.main` runs with.
    from cmim_jax import xla_tuning  # pylint: disable=g-import-not-at-top
    flags += xla_tuning.extra_flags(" ".join(flags))
  env["XLA_FLAGS"] = " ".join(flags)
  if args.device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO, os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
  return env


def _per_model(value: str, models: list) -> dict:
  values = [int(v) for v in str(value).split(",")]
  if len(values) == 1:
    values *= len(models)
  if len(values) != len(models) or min(values) < 1:
    raise ValueError(f"expected one positive value or one per model {models}, got {value!r}")
  return dict(zip(models, values))


def _run_case(args, model: str, case: str, steps: int, repeats: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--model", model,
         "--batch_size", str(args.batch_size), "--steps", str(steps),
         "--repeats", str(repeats), "--warmup", str(args.warmup),
         "--threads", str(args.threads), "--device", args.device]
  if args.torch_channels_last:
    cmd.append("--torch_channels_last")
  proc = subprocess.run(cmd, env=_child_env(args), capture_output=True, text=True)
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr)
    raise RuntimeError(f"case {case} of {model} failed (exit {proc.returncode})")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine(args) -> dict:
  import jax
  import torch
  return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
          "torch": torch.__version__, "device": args.device,
          "load_avg_at_start": os.getloadavg()}


def _version(pkg):
  from importlib import metadata
  try:
    return metadata.version(pkg)
  except metadata.PackageNotFoundError:
    return None


def _twin_parity(args, models: list):
  """Proves each PyTorch twin computes the JAX model's logits and gradients
  (``bench/twin_parity.py``) before their speeds are compared."""
  if args.no_parity:
    print("twin parity NOT checked (--no_parity)", flush=True)
    return None
  import twin_parity  # pylint: disable=g-import-not-at-top
  result = twin_parity.run(models)
  for name, r in result["models"].items():
    print(f"{name:9s} twin parity {'ok' if r['ok'] else 'FAILED'}: max rel error "
          f"{r['max_rel']:.1e} (logits, gradients; float64)", flush=True)
  if not result["ok"]:
    raise SystemExit("the PyTorch twin is not the same BNN as the JAX model "
                     f"(bench/twin_parity.py: {json.dumps(result)}); not timing them.")
  return {name: {k: r[k] for k in ("ok", "max_rel", "max_abs_logits", "max_rel_grad_params",
                                   "max_rel_grad_input")}
          for name, r in result["models"].items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet20,vgg_small,resnet18")
  p.add_argument("--cases", default=",".join(CASES),
                 help="jax_pair: base and CMIM in one process, alternating windows "
                      "(cmim_overhead_interleaved, robust to load changes)")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", default="5", help="steps per timed window; one value, or one "
                 "per model (comma-separated, in --models order)")
  p.add_argument("--repeats", default="5", help="timed windows (median reported); one value "
                 "or one per model")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="torch intra-op threads (XLA:CPU uses all cores by default)")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--torch_channels_last", action="store_true")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for the JAX cases")
  p.add_argument("--no_xla_tuning", action="store_true",
                 help="leave out cmim_jax.xla_tuning's flags (XLA defaults)")
  p.add_argument("--no_parity", action="store_true",
                 help="skip bench/twin_parity.py (then jax_vs_torch compares two "
                      "networks not shown to be the same BNN)")
  p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.case:  # Child: one case, one JSON line.
    args.steps, args.repeats = int(args.steps), int(args.repeats)
    if args.case == "torch":
      result = run_torch(args)
    elif args.case == "jax_pair":
      result = run_jax_pair(args)
    else:
      result = run_jax(args, args.case == "jax_cmim")
    print(json.dumps(result))
    return

  cases = [c for c in args.cases.split(",") if c]
  models = [m for m in args.models.split(",") if m]
  steps, repeats = _per_model(args.steps, models), _per_model(args.repeats, models)
  report = {"batch_size": args.batch_size, "steps": steps, "repeats": repeats,
            "warmup": args.warmup, "threads": args.threads, "xla_flags": _child_env(args)["XLA_FLAGS"],
            "machine": _machine(args), "models": {}}
  if "torch" in cases:
    report["twin_parity"] = _twin_parity(args, models)
  for model in models:
    res = {}
    for case in cases:
      res[case] = r = _run_case(args, model, case, steps[model], repeats[model])
      if case == "jax_pair":
        print(f"{model:9s} {case:9s} cmim_overhead {r['cmim_overhead']:.3f}  windows "
              f"{[round(x, 3) for x in r['window_ratios']]}", flush=True)
        continue
      print(f"{model:9s} {case:9s} {r['images_per_s']:8.1f} img/s  windows "
            f"{[round(x, 1) for x in r['window_rates']]}  peak RSS +{r['peak_rss_delta_mb']:.0f} MB"
            f"  steady RSS +{r['steady_rss_delta_mb']:.0f} MB", flush=True)
    counts = {c: res[c]["num_params"] for c in res}
    if len(set(counts.values())) > 1:
      raise AssertionError(f"{model}: parameter counts differ: {counts}")
    summary = {"num_params": next(iter(counts.values()), None)}
    for case, r in res.items():
      if case == "jax_pair":
        summary["cmim_overhead_interleaved"] = round(r["cmim_overhead"], 4)
        continue
      summary[f"{case}_images_per_s"] = round(r["images_per_s"], 2)
      for key in ("peak_rss_mb", "peak_rss_delta_mb", "steady_rss_delta_mb", "xla_temp_mb",
                  "device_peak_mb", "compile_s"):
        if r.get(key) is not None:
          summary[f"{case}_{key}"] = round(r[key], 1)
    if "jax_base" in res and "jax_cmim" in res:
      # Step time ratio: cmim seconds per step over base seconds per step.
      summary["cmim_overhead"] = round(
          res["jax_base"]["images_per_s"] / res["jax_cmim"]["images_per_s"], 4)
    if "jax_cmim" in res:
      summary["cmim_layers"] = res["jax_cmim"]["cmim_layers"]
      summary["cmim_head_params"] = res["jax_cmim"]["objective_params"]
    if "jax_base" in res and "torch" in res:
      summary["jax_vs_torch"] = round(
          res["jax_base"]["images_per_s"] / res["torch"]["images_per_s"], 4)
    report["models"][model] = summary
  report["machine"]["load_avg_at_end"] = os.getloadavg()
  print(json.dumps(report))


if __name__ == "__main__":
  main()
