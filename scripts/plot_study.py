"""Table and plot of validation accuracy against step from runs' metrics.jsonl.

  python scripts/plot_study.py runs/cifar10_cpu --out docs/cifar10_cpu_study.png

Every subdirectory of the given folder holding a metrics.jsonl is one run,
named ``<label>-s<seed>``. Prints a markdown table (final and best validation
accuracy, steps, images seen, training wall time) and writes the PNG.
"""

import argparse
import collections
import json
import os
import platform


LABELS = {"fp": "ResNet-20 full precision", "base": "ResNet-20 1w1a (CMIM weight 0)",
          "cmim": "ResNet-20 1w1a + CMIM (weight 3.2)"}


def load(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval" and "eval_split" not in r]
  return train, evals


def training_seconds(train):
  """Wall time of training, summed over resumed segments (elapsed_s restarts)."""
  total, last = 0.0, 0.0
  for r in train:
    t = r.get("elapsed_s", float("nan"))
    if t < last:  # A resumed process: the previous segment ended at `last`.
      total += last
    last = t
  return total + last


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("root")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  runs = collections.OrderedDict()
  for name in sorted(os.listdir(args.root)):
    d = os.path.join(args.root, name)
    if os.path.isfile(os.path.join(d, "metrics.jsonl")):
      runs[name] = load(d)
  if not runs:
    raise SystemExit(f"no run with a metrics.jsonl under {args.root}")

  order = {k: i for i, k in enumerate(LABELS)}
  names = sorted(runs, key=lambda n: (order.get(n.rsplit("-s", 1)[0], 99), n))
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
  print("| run | seed | val. accuracy (final) | best | steps | images seen | train wall time |")
  print("|---|---|---|---|---|---|---|")
  for n in names:
    train, evals = runs[n]
    label, seed = n.rsplit("-s", 1) if "-s" in n else (n, "?")
    steps = train[-1]["step"] if train else 0
    images = train[-1].get("images_seen", 0) if train else 0
    wall = training_seconds(train)
    final = evals[-1]["accuracy"] if evals else float("nan")
    best = max(e["accuracy"] for e in evals) if evals else float("nan")
    images_txt = f"{images:,}"
    print(f"| {LABELS.get(label, label)} | {seed} | {100 * final:.2f}% | {100 * best:.2f}% | "
          f"{steps} | {images_txt} | {wall / 60:.1f} min |")

  if args.out:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n in names:
      _, evals = runs[n]
      label, seed = n.rsplit("-s", 1) if "-s" in n else (n, "?")
      ax.plot([e["step"] for e in evals], [100 * e["accuracy"] for e in evals],
              marker="o", ms=3, label=f"{LABELS.get(label, label)}, seed {seed}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%), train[45000:]")
    ax.set_title("CIFAR-10, CPU budget (scripts/cifar10_cpu_study.sh)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
