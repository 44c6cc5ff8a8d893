r"""Command line: pack a trained run, check it, serialise it.

  python -m cmim_jax.export --workdir runs/x --out model.cmimbnn
  python -m cmim_jax.export --workdir runs/x --out model.cmimbnn --check
  python -m cmim_jax.export --workdir runs/x --out model.cmimbnn --stablehlo model.jaxexport

The run's config is read from ``WORKDIR/config.json``; ``--config FILE.py``
(with the same ``--config.x=...`` overrides as training) replaces it.
``--check`` runs the packed model and the training model's eval forward on
the config's evaluation split and fails (exit 2) unless every image gets the
same class and the logits agree to float tolerance.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's config file (default: WORKDIR/config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, config.json).")
_OUT = flags.DEFINE_string("out", None, "The .cmimbnn file to write (or to check with --check).")
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step (default: the newest intact one; --check alone: the file's).")
_IMAGE_SHAPE = flags.DEFINE_list("image_shape", None,
                                 "H,W,C for datasets whose shape is unknown without data.")
_CHECK = flags.DEFINE_bool("check", False, "Compare packed and float logits on the eval split.")
_CHECK_EXAMPLES = flags.DEFINE_integer("check_examples", 0,
                                       "Examples to compare (0 = the whole eval split).")
_STABLEHLO = flags.DEFINE_string("stablehlo", None,
                                 "Also write the packed function as jax.export bytes here.")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"],
                               "Platforms the --stablehlo artifact is lowered for.")
_NO_EXPORT = flags.DEFINE_bool("no_export", False, "With --check: check the existing --out file.")

flags.mark_flags_as_required(["workdir", "out"])

# The tolerance of --check: |packed - float| <= RTOL * max|float logit| + ATOL.
RTOL, ATOL = 1e-5, 1e-5


def _check(config, workdir, out, step, max_examples):
  import jax
  import numpy as np
  from cmim_jax import export, input_pipeline
  packed = export.load(out)
  # The step the file was packed from, not the newest one: a run still
  # training may have saved another since.
  if step is None:
    step = packed.manifest.get("step")
  variables, step = export.restore_variables(workdir, step)
  model = export.build_model(config, packed.manifest["num_classes"])
  _, eval_ds, info = input_pipeline.get_datasets(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=0, process_count=1)
  if eval_ds is None:
    raise ValueError("config.data.eval_split is empty; name a split to check on, e.g. "
                     "--config.data.eval_split=test.")
  if tuple(info.image_shape) != tuple(packed.input_shape):
    raise ValueError(f"the eval split has images {info.image_shape}, the packed model "
                     f"{packed.input_shape}.")
  v = {k: variables[k] for k in ("params", "batch_stats")}
  ref_fn = jax.jit(lambda x: model.apply(v, x, train=False))
  got_fn = jax.jit(packed.forward)
  n = agree = correct_ref = correct_got = 0
  worst = scale = 0.0
  for batch in eval_ds.iterator():
    keep = np.asarray(batch["mask"]) > 0
    x = packed.program.normalize(jax.numpy.asarray(batch["image"]))
    ref, got = np.asarray(ref_fn(x))[keep], np.asarray(got_fn(x))[keep]
    labels = np.asarray(batch["label"])[keep]
    n += len(labels)
    agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
    correct_ref += int(np.sum(ref.argmax(-1) == labels))
    correct_got += int(np.sum(got.argmax(-1) == labels))
    worst = max(worst, float(np.max(np.abs(ref - got), initial=0.0)))
    scale = max(scale, float(np.max(np.abs(ref), initial=0.0)))
    if max_examples and n >= max_examples:
      break
  ok = agree == n and worst <= RTOL * scale + ATOL
  print(f"check on {config.data.name} {config.data.eval_split} (step {step}): {n} images, "
        f"argmax identical on {agree}/{n}, max |logit diff| {worst:.3g} (max |logit| "
        f"{scale:.3g}), accuracy float {correct_ref / max(n, 1):.4f} packed "
        f"{correct_got / max(n, 1):.4f}: {'OK' if ok else 'MISMATCH'}")
  return ok


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cmim_jax import export  # pylint: disable=g-import-not-at-top
  try:
    config = _CONFIG.value if _CONFIG.value is not None else export.load_run_config(_WORKDIR.value)
    shape = tuple(int(v) for v in _IMAGE_SHAPE.value) if _IMAGE_SHAPE.value else None
    if not _NO_EXPORT.value:
      result = export.export_workdir(_WORKDIR.value, _OUT.value, config=config,
                                     step=_STEP.value, image_shape=shape)
      print(result.summary())
    if _STABLEHLO.value:
      data = export.serialize(export.load(_OUT.value), platforms=_PLATFORMS.value)
      with open(_STABLEHLO.value, "wb") as f:
        f.write(data)
      print(f"jax.export artifact: {_STABLEHLO.value} ({len(data) / 2**20:.2f} MiB, "
            f"{', '.join(_PLATFORMS.value)}, any batch size)")
    if _CHECK.value and not _check(config, _WORKDIR.value, _OUT.value, _STEP.value,
                                   _CHECK_EXAMPLES.value):
      sys.exit(2)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
