r"""Paired comparison of step variants: block outputs materialized or not.

Builds ``cmim_jax.train.train_step`` (base BNN, one CPU device, the setup of
``bench/train_step.py``) once per variant, then times them in alternating
windows in one process (A B C A B C ...), so that a change of machine load
hits every variant alike. Variants: ``plain`` (``MATERIALIZE_ON_CPU`` off:
XLA:CPU fuses each BatchNorm/hardtanh/residual chain into every consumer,
recomputing it), ``materialized`` (as shipped: BiRealBlock outputs stored
once, ``models.common.materialize_on_cpu``) and ``every_hardtanh`` (also
every hardtanh output, measured but not shipped). Reports, per variant, the
median over windows of (baseline window time / variant window time): > 1
means faster than the first variant. Also the compiled program's XLA temp
size and its count of HLO instructions and fusions (load-independent). All
variants compute the same values (``x / 1`` is ``x``): the final losses are
printed side by side. Last stdout line: one JSON object.

  python bench/step_levers.py --models resnet20,vgg_small,resnet18
  python bench/step_levers.py --models vgg_small,resnet18 --variants plain,every_hardtanh
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

# plain: nothing materialized; materialized: as shipped (BiRealBlock outputs);
# every_hardtanh: also every hardtanh output of every model (measured, not shipped).
VARIANTS = ("plain", "materialized", "every_hardtanh")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _hlo_counts(compiled) -> dict:
  text = compiled.as_text()
  entry = text[text.find("ENTRY"):]
  return {"hlo_instructions": len(re.findall(r"\n\s+(?:ROOT )?%\S+ = ", text)),
          "fusions": len(re.findall(r"= \S+ fusion\(", entry)),
          "copies": len(re.findall(r"= \S+ copy\(", entry)),
          "transposes": len(re.findall(r"transpose\(", text)),
          "convolutions": len(re.findall(r"convolution\(", text)),
          "dots": len(re.findall(r" dot\(", text))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="resnet20,vgg_small,resnet18")
  p.add_argument("--variants", default="plain,materialized", help=", ".join(VARIANTS) +
                 "; the first is the baseline")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=2, help="steps per window")
  p.add_argument("--repeats", type=int, default=5, help="rounds of windows")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--no_xla_tuning", action="store_true",
                 help="leave out cmim_jax.xla_tuning's flags (XLA defaults)")
  args = p.parse_args(argv)

  if not args.no_xla_tuning:  # As `python -m cmim_jax.main` and bench/train_step.py run.
    from cmim_jax import xla_tuning
    xla_tuning.apply()
  import jax
  from cmim_jax.models import common
  import train_step

  report = {"batch_size": args.batch_size, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_avg_at_start": os.getloadavg(), "models": {}}
  variants = args.variants.split(",")
  for model in args.models.split(","):
    ns = argparse.Namespace(model=model, batch_size=args.batch_size, warmup=args.warmup)
    cases = {}
    for v in variants:
      if v not in VARIANTS:
        raise ValueError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
      saved = common.MATERIALIZE_ON_CPU, common.hardtanh
      common.MATERIALIZE_ON_CPU = v != "plain"
      if v == "every_hardtanh":
        common.hardtanh = lambda x, clip=saved[1]: common.materialized(clip(x))
      try:  # Both are read while the step is traced, inside build_jax.
        cases[v] = train_step.build_jax(ns, cmim=False)
      finally:
        common.MATERIALIZE_ON_CPU, common.hardtanh = saved
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
      for v in variants:
        c = cases[v]
        c["sync"]()
        t0 = time.perf_counter()
        c["run_steps"](args.steps)
        c["sync"]()
        times[v].append(time.perf_counter() - t0)
    out = {}
    for v in variants:
      speedups = [b / t for b, t in zip(times[variants[0]], times[v])]
      out[v] = {"speedup_vs_" + variants[0]: round(statistics.median(speedups), 3),
                "window_speedups": [round(s, 3) for s in speedups],
                "images_per_s_under_load": round(
                    args.steps * args.batch_size / statistics.median(times[v]), 1),
                "loss": cases[v]["final_loss"](),
                "xla_temp_mb": round(cases[v]["meta"]["xla_temp_mb"], 1),
                **_hlo_counts(cases[v]["compiled"])}
      print(f"{model:9s} {v:6s} x{out[v]['speedup_vs_' + variants[0]]:.3f} "
            f"(windows {out[v]['window_speedups']})  temp {out[v]['xla_temp_mb']} MB  "
            f"HLO instructions {out[v]['hlo_instructions']} fusions {out[v]['fusions']}  loss {out[v]['loss']:.5f}", flush=True)
    report["models"][model] = out
    del cases
    jax.clear_caches()
  report["load_avg_at_end"] = os.getloadavg()
  print(json.dumps(report))


if __name__ == "__main__":
  main()
