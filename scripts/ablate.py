r"""Ablation grid: seeds x settings of short runs, held-out accuracy mean and spread.

  python scripts/ablate.py --steps 600 --seeds 0,1,2,3,4 --out runs/ablate_digits

Trains every setting (a name and a list of config overrides on top of
``--config``, by default the offline digits demo) once per seed for
``--steps`` steps, evaluates each run once, at its last step, on the
config's ``data.eval_split`` (digits: the 297 'test' images, disjoint from
the 1,500 'train' images; no run selects anything on them), and prints a
markdown table: mean, standard deviation (n - 1) and range of the held-out
accuracy over seeds, the difference of the means from the first setting, and
every run's number. It writes the same as JSON to ``--json`` (default
``OUT/ablation.json``) and prints it compactly as the last line of stdout.

Settings that distil from a teacher (``teacher={teacher}`` in their
overrides) use one full-precision teacher that the script trains first
(``--teacher`` overrides, ``--teacher_steps``), with seed 0, in
``OUT/teacher``. Add a setting with ``--setting NAME KEY=VALUE ...``
(repeatable), pick the built-in ones with ``--settings ce,kd``, and shrink
every run (e.g. the tests' tiny model) with ``--override KEY=VALUE``.

All runs share one Python process: JAX, the data and the compiled steps'
persistent cache (``~/.cache/cmim_jax/jax_cache``, as ``cmim_jax.main``)
are set up once, so the later seeds of a setting load its compiled steps
instead of compiling them; each run still goes through
``train.train_and_evaluate``, the function ``python -m cmim_jax.main``
calls, with its own workdir, so a run of the grid is a run of the CLI with
the same config (``OUT/<setting>/seed<k>/config.json``). A finished run
(its ``ablate_result.json`` records the same config) is reused when the
script is run again, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The paper's objectives on the digits demo. '{teacher}' is the workdir of the
# teacher trained by this script. Both memory-bank forms draw 512 negatives
# (the digits have 1,500 training images, too few for the defaults' 4,096; 512 is
# 8x the 63 in-batch negatives at a CPU cost this grid can afford).
SETTINGS = {
    "ce": ["objectives=ce"],
    "cmim_batch": ["objectives=ce,cmim", "cmim.negatives=batch"],
    "cmim_memory": ["objectives=ce,cmim", "cmim.negatives=memory",
                    "cmim.num_negatives=512"],
    "kd": ["objectives=ce,kd", "kd.temperature=4.0", "teacher={teacher}"],
    "crd": ["objectives=ce,crd", "crd.num_negatives=512", "teacher={teacher}"],
}
# The teacher: the same network in full precision, cross entropy only.
TEACHER = ["model.name=resnet20_fp", "objectives=ce"]
RESULT_FILE = "ablate_result.json"


def load_config(spec: str):
  """``path[:variant]`` of a config file -> its ``get_config(variant)``."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path!r} is not a file; give a config file such as "
                            "configs/digits.py.")
  module_spec = importlib.util.spec_from_file_location("_ablate_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def apply_override(config, override: str) -> None:
  """Sets ``KEY=VALUE`` (dotted key) on ``config``, parsing VALUE by the key's type.

  Strings are taken as written; other types (numbers, bools, tuples) are
  parsed as Python literals, as ml_collections' ``--config.KEY=`` flags do.

  Raises:
    ValueError: when the override has no '=', names no key of the config or
      its value does not parse as the key's type.
  """
  key, sep, text = override.partition("=")
  if not sep or not key:
    raise ValueError(f"override {override!r} is not KEY=VALUE (e.g. cmim.weight=0.5).")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise ValueError(f"override {override!r}: config has no section {part!r}.")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"override {override!r}: config has no key {key!r}; see "
                     "cmim_jax/default_config.py for the keys.")
  kind = node.get_type(leaf)
  if kind is str:
    value = text
  elif kind is bool:
    if text.lower() not in ("true", "false"):
      raise ValueError(f"override {override!r}: {key} is a bool; write true or false.")
    value = text.lower() == "true"
  else:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ValueError(f"override {override!r}: {text!r} is not a {kind.__name__} "
                       "literal.") from None
    if kind is tuple and isinstance(value, list):
      value = tuple(value)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f"override {override!r}: {e}") from None


def run_config(args, overrides: list[str], *, seed: int, steps: int):
  """The config of one run: ``--config``, ``--override``s, the setting's, budget, seed."""
  config = load_config(args.config)
  for override in list(args.override) + list(overrides):
    apply_override(config, override)
  if not config.data.eval_split or config.data.eval_split == config.data.train_split:
    raise ValueError(f"data.eval_split={config.data.eval_split!r} gives no held-out number "
                     f"(data.train_split={config.data.train_split!r}); name a split that "
                     "training does not see, e.g. data.eval_split=test.")
  config.seed = seed
  config.num_train_steps = steps
  # One evaluation, at the last step: the number in the table, chosen by no one.
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.log_every_steps = min(config.log_every_steps, steps)
  return config


def train_one(config, workdir: str, overrides: list[str], *, verbose: bool) -> dict:
  """Trains one run (or reuses its finished result); returns its result record."""
  from cmim_jax import train  # pylint: disable=g-import-not-at-top
  from cmim_jax.metric_writers import read_metrics  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, RESULT_FILE)
  key = config.to_json(sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if done.get("config") == key:
      done["reused"] = True
      return done
    raise FileExistsError(f"{workdir} holds a run of another config; delete it or choose "
                          "another --out.")
  start = time.time()
  result = train.train_and_evaluate(config, workdir)
  wall = time.time() - start
  # The evaluation record that the run wrote: the number must be the run's own.
  evals = [r for r in read_metrics(workdir) if r["split"] == "eval"]
  del result  # The metrics file also holds it when a resumed run had nothing left to do.
  if not evals or evals[-1]["step"] != config.num_train_steps:
    raise RuntimeError(f"run in {workdir} ended without an evaluation at step "
                       f"{config.num_train_steps}; see its log.")
  record = {"seed": int(config.seed), "accuracy": float(evals[-1]["accuracy"]),
            "loss": float(evals[-1]["loss"]), "num_examples": int(evals[-1]["num_examples"]),
            "step": int(evals[-1]["step"]), "wall_s": round(wall, 1), "workdir": workdir,
            "overrides": overrides, "config": key}
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  if verbose:
    print(f"  {workdir}: accuracy {record['accuracy']:.4f} in {wall:.0f} s", flush=True)
  return dict(record, reused=False)


def summarize(accuracies: list[float]) -> dict:
  a = np.asarray(accuracies, np.float64)
  return {"n": int(a.size), "mean": float(a.mean()),
          "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
          "min": float(a.min()), "max": float(a.max())}


def markdown_table(report: dict) -> str:
  """The table: one row per setting, in percent, with every run's number."""
  names = list(report["settings"])
  base = report["settings"][names[0]]["summary"]["mean"]
  lines = [f"| setting | overrides | n | mean | std | min-max | vs {names[0]} | per seed |",
           "|---|---|---|---|---|---|---|---|"]
  for name in names:
    s = report["settings"][name]
    m = s["summary"]
    runs = " ".join(f"{100 * r['accuracy']:.2f}" for r in s["runs"])
    overrides = " ".join(f"`{o}`" for o in s["overrides"])
    lines.append(f"| {name} | {overrides} | {m['n']} | {100 * m['mean']:.2f} | "
                 f"{100 * m['std']:.2f} | {100 * m['min']:.2f}-{100 * m['max']:.2f} | "
                 f"{100 * (m['mean'] - base):+.2f} | {runs} |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/digits.py", help="config file[:variant].")
  p.add_argument("--out", default="runs/ablate", help="folder for every run's workdir.")
  p.add_argument("--json", default="", help="report path (default OUT/ablation.json).")
  p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds.")
  p.add_argument("--steps", type=int, default=600, help="training steps of every run.")
  p.add_argument("--settings", default=",".join(SETTINGS),
                 help=f"built-in settings to run, comma-separated ('' = none); "
                      f"known: {', '.join(SETTINGS)}.")
  p.add_argument("--setting", nargs="+", action="append", default=[],
                 metavar=("NAME", "KEY=VALUE"),
                 help="an extra setting: its name and overrides; repeatable.")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="applied to every run, the teacher's included; repeatable.")
  p.add_argument("--teacher", nargs="*", default=TEACHER, metavar="KEY=VALUE",
                 help="the teacher's overrides.")
  p.add_argument("--teacher_steps", type=int, default=0, help="0 = --steps.")
  p.add_argument("--quiet", action="store_true", help="no per-run lines, no training log.")
  return p.parse_args(argv)


def build_grid(args) -> dict[str, list[str]]:
  grid = {}
  for name in [n for n in args.settings.split(",") if n]:
    if name not in SETTINGS:
      raise ValueError(f"--settings names {name!r}; the built-in ones are "
                       f"{', '.join(SETTINGS)} (add your own with --setting NAME KEY=VALUE).")
    grid[name] = list(SETTINGS[name])
  for name, *overrides in args.setting:
    if name in grid or "=" in name:
      raise ValueError(f"--setting {name!r}: give a new name first, then KEY=VALUE overrides.")
    grid[name] = overrides
  if not grid:
    raise ValueError("no settings to run; name some with --settings or --setting.")
  return grid


def main(argv=None) -> dict:
  args = parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  if not seeds or args.steps <= 0:
    raise ValueError("give at least one seed (--seeds 0,1) and --steps > 0.")
  grid = build_grid(args)
  # Check every override before any training.
  for overrides in list(grid.values()) + [args.teacher]:
    run_config(args, [o.replace("{teacher}", "/nonexistent") for o in overrides],
               seed=0, steps=args.steps)

  from absl import logging  # pylint: disable=g-import-not-at-top
  from cmim_jax import xla_tuning  # pylint: disable=g-import-not-at-top
  xla_tuning.apply()  # As cmim_jax.main: before JAX starts.
  import jax  # pylint: disable=g-import-not-at-top
  xla_tuning.enable_compilation_cache()
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING if args.quiet else logging.INFO)
  try:
    return _run_grid(args, seeds, grid, argv, jax)
  finally:
    logging.set_verbosity(verbosity)


def _run_grid(args, seeds: list[int], grid: dict[str, list[str]], argv, jax) -> dict:
  """Trains the teacher (if a setting needs one) and every run; prints and writes the report."""
  verbose = not args.quiet

  t0 = time.time()
  report = {"command": " ".join(["python scripts/ablate.py"] + list(
      sys.argv[1:] if argv is None else argv)),
            "config": args.config, "steps": args.steps, "seeds": seeds,
            "global_overrides": list(args.override),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpus": os.cpu_count(), "backend": jax.default_backend(),
                        "devices": jax.device_count()},
            "teacher": None, "settings": {}}
  teacher_dir = os.path.join(args.out, "teacher")
  if any("{teacher}" in o for overrides in grid.values() for o in overrides):
    steps = args.teacher_steps or args.steps
    if verbose:
      print(f"teacher ({' '.join(args.teacher)}), {steps} steps", flush=True)
    config = run_config(args, args.teacher, seed=0, steps=steps)
    report["teacher"] = train_one(config, teacher_dir, list(args.teacher), verbose=verbose)
  grid = {name: [o.replace("{teacher}", teacher_dir) for o in overrides]
          for name, overrides in grid.items()}
  runs = {name: [] for name in grid}
  # Seed-major: an interrupted grid has every setting for its first seeds.
  for seed in seeds:
    for name, overrides in grid.items():
      if verbose:
        print(f"{name} seed {seed} ({' '.join(overrides)})", flush=True)
      config = run_config(args, overrides, seed=seed, steps=args.steps)
      runs[name].append(train_one(config, os.path.join(args.out, name, f"seed{seed}"),
                                  overrides, verbose=verbose))
  for name, overrides in grid.items():
    report["settings"][name] = {"overrides": overrides, "runs": runs[name],
                                "summary": summarize([r["accuracy"] for r in runs[name]])}
  report["wall_s"] = round(time.time() - t0, 1)
  for record in [report["teacher"]] + [r for s in report["settings"].values() for r in s["runs"]]:
    if record:
      record.pop("config", None)  # In each run's config.json; too long for the report.

  table = markdown_table(report)
  report["table"] = table
  path = args.json or os.path.join(args.out, "ablation.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  print()
  if report["teacher"]:
    print(f"teacher: {100 * report['teacher']['accuracy']:.2f}% held-out accuracy")
  print(f"{args.config}, {args.steps} steps per run, seeds {seeds}, held-out accuracy (%):")
  print(table)
  print(f"wall time {report['wall_s']:.0f} s; report in {path}")
  print(json.dumps(report, separators=(",", ":")), flush=True)
  return report


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
