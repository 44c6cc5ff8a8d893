r"""Start-up time: seconds from ``python -m cmim_jax.main`` to the first logged step.

Each run launches the real command line in a fresh process with a fresh
workdir, ``--config.log_every_steps=1 --config.num_train_steps=N`` and reads
its log as it comes; the clock starts just before the launch. Reported per
run, in seconds since launch:

* ``jax_ready``: the "JAX process ..." line (Python, absl, JAX imported, the
  backend up);
* ``training``: the "Training ..." line (data loaded, model initialised, state
  placed on the devices);
* ``first_step``: the "step 1/N" line (the train step compiled and run once,
  its metrics fetched): the number this benchmark is about.

The process is then stopped: what follows (evaluation, checkpoints) is not
start-up. Three settings of the persistent compilation cache are compared:

* ``no_cache``: ``CMIM_JAX_COMPILATION_CACHE=0`` (the "before");
* ``cold_cache``: an empty cache directory (the first run of a configuration,
  which also fills the cache);
* ``warm_cache``: the same directory again (every later run: the "after").

Configs: ``digits`` (``configs/digits.py``, the offline demo) and
``cifar10_cpu`` (``configs/cifar10.py:study``, ResNet-20, batch 64; needs the
CIFAR-10 training archive: ``--cifar10_data`` or, where present, the shared
``cifar10-train.tar.gz`` beside the checkout).

  python bench/startup.py                          # both configs, 3 runs each
  python bench/startup.py --configs digits --runs 5

Last stdout line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKS = {"jax_ready": re.compile(r"JAX process \d+/\d+"),
         "training": re.compile(r"\] Training "),
         "first_step": re.compile(r"\] step 1/\d+")}
SETTINGS = ("no_cache", "cold_cache", "warm_cache")


def _default_cifar10() -> str:
  base = os.environ.get("CMIM_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
  if not os.path.isdir(base):  # A worktree under /work/wt: the shared folder is two up.
    base = os.path.join(REPO, "..", "..", "shared", "data")
  return os.path.abspath(os.path.join(base, "cifar10-train.tar.gz"))


def _configs(args) -> dict:
  return {
      "digits": ["--config", "configs/digits.py"],
      "cifar10_cpu": ["--config", "configs/cifar10.py:study",
                      f"--config.data.data_dir={args.cifar10_data}"],
  }


def time_run(cmd: list, env: dict, timeout: float) -> dict:
  """Seconds from launch to each of ``MARKS``; stops the process after the last."""
  marks, tail = {}, []
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
  timer.start()
  try:
    for line in proc.stderr:
      now = time.perf_counter() - start
      tail = (tail + [line])[-20:]
      for name, pattern in MARKS.items():
        if name not in marks and pattern.search(line):
          marks[name] = now
      if "first_step" in marks:
        break
  finally:
    timer.cancel()
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
  if "first_step" not in marks:
    raise RuntimeError(f"no first step logged (exit {proc.returncode}):\n{''.join(tail)}")
  return marks


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", default="digits,cifar10_cpu")
  p.add_argument("--settings", default=",".join(SETTINGS))
  p.add_argument("--runs", type=int, default=3, help="runs of no_cache and of warm_cache")
  p.add_argument("--steps", type=int, default=2, help="--config.num_train_steps of each run")
  p.add_argument("--cifar10_data", default=_default_cifar10())
  p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
  args = p.parse_args(argv)

  configs = _configs(args)
  settings = [s for s in args.settings.split(",") if s]
  report = {"runs": args.runs, "load_avg_at_start": os.getloadavg(), "configs": {}}
  cache_root = tempfile.mkdtemp(prefix="cmim_startup_cache_")
  try:
    for name in [c for c in args.configs.split(",") if c]:
      if name == "cifar10_cpu" and not os.path.exists(args.cifar10_data):
        print(f"{name}: skipped, no CIFAR-10 archive at {args.cifar10_data}", flush=True)
        continue
      cache = os.path.join(cache_root, name)
      result = {}
      for setting in settings:
        runs = 1 if setting == "cold_cache" else args.runs
        if setting == "cold_cache":
          shutil.rmtree(cache, ignore_errors=True)
        elif setting == "warm_cache" and not os.path.isdir(cache):
          # Fill the cache first, untimed, when cold_cache was not asked for.
          fill = tempfile.mkdtemp(prefix="cmim_startup_run_")
          time_run(*_command(args, configs[name], cache, fill), args.timeout)
          shutil.rmtree(fill, ignore_errors=True)
        times = []
        for _ in range(runs):
          workdir = tempfile.mkdtemp(prefix="cmim_startup_run_")
          try:
            times.append(time_run(*_command(args, configs[name],
                                            None if setting == "no_cache" else cache,
                                            workdir), args.timeout))
          finally:
            shutil.rmtree(workdir, ignore_errors=True)
        summary = {k: round(statistics.median(t[k] for t in times), 2) for k in MARKS
                   if all(k in t for t in times)}
        summary["first_step_runs"] = [round(t["first_step"], 2) for t in times]
        result[setting] = summary
        print(f"{name:12s} {setting:10s} first step {summary['first_step']:6.1f} s  "
              f"(jax ready {summary.get('jax_ready', float('nan')):.1f} s, training "
              f"{summary.get('training', float('nan')):.1f} s)  runs {summary['first_step_runs']}",
              flush=True)
      if "no_cache" in result and "warm_cache" in result:
        result["speedup_warm_vs_no_cache"] = round(
            result["no_cache"]["first_step"] / result["warm_cache"]["first_step"], 3)
      report["configs"][name] = result
  finally:
    shutil.rmtree(cache_root, ignore_errors=True)
  report["load_avg_at_end"] = os.getloadavg()
  print(json.dumps(report))


def _command(args, config_args: list, cache, workdir: str):
  env = dict(os.environ)
  env["CMIM_JAX_COMPILATION_CACHE"] = cache or "0"
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  cmd = [sys.executable, "-m", "cmim_jax.main", *config_args, "--workdir", workdir,
         "--config.log_every_steps=1", f"--config.num_train_steps={args.steps}"]
  return cmd, env


if __name__ == "__main__":
  main()
