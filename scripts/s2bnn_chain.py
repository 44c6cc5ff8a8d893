r"""S2-BNN on CIFAR-10 end to end, label-free, and its table.

  PYTHONPATH=. python scripts/s2bnn_chain.py cpu --out runs/s2bnn_cpu [--seed 0]
  PYTHONPATH=. python scripts/s2bnn_chain.py smoke --out /tmp/s2bnn_smoke

Stages (``configs/s2bnn_cifar10.py``), in order, each in ``OUT/STAGE``:

  teacher       FP ``resnet20_fp`` trained with ``moco`` (the self-supervised teacher)
  moco          1w1a ``resnet20`` with ``moco`` only (the MoCo v2 BNN baseline)
  calibration   1w1a ``resnet20`` with ``calibration`` from ``OUT/teacher`` (S2-BNN)

then a linear probe of each frozen backbone (``--mode linear_probe``,
``cmim_jax/linear_probe.py``) on the held-out split, and a table of the
probes' top-1. The data: the shared CIFAR-10 image folder
(``../shared/data/cifar10-train.tar.gz``) when it exists, else the config's
own (tfds or the downloaded archive). Finished stages are skipped and cut
ones resume, so re-running the command continues the chain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

STAGES = ("teacher", "moco", "calibration")


def stage_config(stage: str, budget: str, out: str, *, seed: int = 0, data_dir: str = ""):
  """The config of one stage (``calibration`` reads ``OUT/teacher``)."""
  from configs import s2bnn_cifar10  # pylint: disable=g-import-not-at-top
  config = s2bnn_cifar10.get_config(f"{stage},{budget}" if budget else stage)
  config.seed = seed
  if data_dir:
    config.data.source, config.data.data_dir = "folder", data_dir
  if stage == "calibration":
    config.teacher = os.path.join(out, "teacher")
  return config


def _last(workdir: str, split: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [r for r in map(json.loads, f) if r.get("split") == split]
  return rows[-1] if rows else {}


def run_chain(budget: str, out: str, *, seed: int = 0, data_dir: str = "", adjust=None,
              probe: bool = True) -> list[dict]:
  """Trains the stages, probes each, returns one row per stage.

  Args:
    budget: '', 'cpu' or 'smoke' (``configs/s2bnn_cifar10.py``).
    out: the chain's directory.
    seed: every stage's seed.
    data_dir: the CIFAR-10 image folder (or its .tar.gz); '' = the config's data.
    adjust: optional ``f(config) -> config`` applied to every stage (tests).
    probe: run the linear probes.
  """
  from cmim_jax import train  # pylint: disable=g-import-not-at-top
  try:
    from cmim_jax import linear_probe  # pylint: disable=g-import-not-at-top
  except ImportError:
    linear_probe = None
  rows = []
  for stage in STAGES:
    config = stage_config(stage, budget, out, seed=seed, data_dir=data_dir)
    if adjust is not None:
      config = adjust(config)
    workdir = os.path.join(out, stage)
    start = time.time()
    train.train_and_evaluate(config, workdir)
    row = {"stage": stage, "model": config.model.name, "objectives": config.objectives,
           "seed": seed, "train_s": round(time.time() - start, 1)}
    last = _last(workdir, "train")
    row.update(steps=last.get("step"), images_seen=last.get("images_seen"),
               loss=last.get("loss"))
    if probe and linear_probe is not None:
      start = time.time()
      linear_probe.run(config, workdir)
      result = _last(workdir, "linear_probe")
      row.update(probe_top1=result.get("top1"), probe_examples=result.get("num_examples"),
                 probe_s=round(time.time() - start, 1))
    rows.append(row)
  return rows


def format_table(rows: list[dict], *, budget: str, eval_split: str) -> str:
  """The rows as a Markdown table."""
  lines = [f"| stage | model | objectives | steps (images) | final train loss | "
           f"linear-probe top-1 on {eval_split} | train + probe min | seed |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    top1 = "n/a (no --mode linear_probe)" if r.get("probe_top1") is None else (
        f"{100 * r['probe_top1']:.2f}% of {r.get('probe_examples')}")
    loss = "-" if r.get("loss") is None else f"{r['loss']:.4f}"
    minutes = (r.get("train_s") or 0) / 60, (r.get("probe_s") or 0) / 60
    lines.append(f"| {r['stage']} | {r['model']} | {r['objectives']} | {r['steps']} "
                 f"({r['images_seen']}) | {loss} | {top1} | {minutes[0]:.1f} + "
                 f"{minutes[1]:.1f} | {r['seed']} |")
  return "\n".join(lines) + f"\n\n(budget: {budget})"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("budget", choices=["smoke", "cpu", "full"])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0,
                      help="optimizer steps per stage (default: the budget's epochs)")
  parser.add_argument("--data_dir", default="",
                      help="CIFAR-10 image folder or .tar.gz (default: the shared one if present)")
  args = parser.parse_args(argv)
  budget = "" if args.budget == "full" else args.budget
  data_dir = args.data_dir
  shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                        "cifar10-train.tar.gz")
  if not data_dir and os.path.exists(shared):
    data_dir = os.path.abspath(shared)
  def adjust(config):
    if args.steps > 0:
      config.num_train_steps = args.steps
    return config
  rows = run_chain(budget, args.out, seed=args.seed, data_dir=data_dir, adjust=adjust)
  from configs import s2bnn_cifar10  # pylint: disable=g-import-not-at-top
  table = format_table(rows, budget=args.budget + (f", {args.steps} steps" if args.steps else ""),
                       eval_split=s2bnn_cifar10.get_config(f"teacher,{budget}").data.eval_split)
  print(table)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "rows.json"), "w") as f:
    json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  sys.exit(main())
