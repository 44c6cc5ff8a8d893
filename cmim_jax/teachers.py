"""Earlier runs as teachers (``config.teacher``) and starting points (``config.init_from``).

Both name the workdir of a run of this library: its ``config.json`` says
what model it trained and its latest checkpoint holds the weights. A teacher
is data, not a model being trained: the step applies it with
``train=False`` under ``stop_gradient``; its variables ride in
``TrainState.teacher`` (so they are checkpointed with the run and placed on
the devices like the rest of the state) and get neither gradients nor
optimizer state. ``init_from`` copies matching weights into a new run's
initial state, for two-step recipes (step 1 binary activations with real
weights, step 2 both binary).

Every check that can fail runs when the run is set up, before any step.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from flax import traverse_util

CONFIG_FILE = "config.json"


def _check_workdir(workdir: str, key: str) -> str:
  from cmim_jax import paths  # Local paths and gs:// alike.
  if not workdir:
    raise ValueError(f"config.{key} is empty.")
  path = paths.resolve(os.path.expanduser(str(workdir)), what=f"config.{key}")
  if not path.is_dir():
    raise FileNotFoundError(f"config.{key}={workdir!r}: no such directory. Point it at the "
                            "--workdir of an earlier training run of cmim_jax.")
  if not (path / CONFIG_FILE).exists():
    raise FileNotFoundError(f"config.{key}={workdir!r} holds no {CONFIG_FILE}, so it is not "
                            "the workdir of a cmim_jax training run; train one there first "
                            "(python -m cmim_jax.main --mode train --workdir ...).")
  ckpt_dir = path / "checkpoints"
  steps = [d.name for d in ckpt_dir.iterdir()] if ckpt_dir.is_dir() else []
  if not any(d.isdigit() for d in steps):
    raise FileNotFoundError(f"config.{key}={workdir!r} has no checkpoint under {ckpt_dir}; "
                            "let that run save one (it saves at its end) before using it.")
  return str(path)


def load_run(workdir: str, key: str = "teacher"):
  """``(config, path)`` of the run in ``workdir``, checked to hold a checkpoint.

  Raises:
    ValueError: ``workdir`` is empty.
    FileNotFoundError: no directory, no config.json or no checkpoint there.
  """
  from cmim_jax import run_config  # pylint: disable=g-import-not-at-top
  path = _check_workdir(workdir, key)
  return run_config.load_run_config(path), path


def build_model(run_config, *, num_classes: int, data_name: str, key: str = "teacher"):
  """The model an earlier run trained, for evaluation (no cross-device BatchNorm)."""
  from cmim_jax import models
  if run_config.data.name != data_name:
    raise ValueError(f"config.{key} was trained on {run_config.data.name!r}, this run trains on "
                     f"{data_name!r}; the classes and the input normalisation must agree.")
  models.import_modules(run_config.imports)
  return models.from_config(run_config.model, num_classes=num_classes, bn_axis_name=None)


def restore_variables(path: str, step: int | None = None, *, objectives: bool = False
                      ) -> tuple[dict, int]:
  """``({'params', 'batch_stats'}, step)`` of the model in a checkpoint of a run.

  Reads only those parts (not the earlier run's optimizer state), local or
  ``gs://``, through :class:`~cmim_jax.checkpointing.Checkpointer`, read-only:
  a damaged newest step is skipped with a warning and left in place.

  Args:
    path: the run directory.
    step: the checkpoint step (default: the newest intact one).
    objectives: also return the run's trained objective-term parameters
      (``'objectives'``: ``{term: params}``, e.g. a MoCo run's projection head).

  Raises:
    FileNotFoundError: no checkpoint in the workdir.
    checkpointing.CheckpointError: ``step`` does not restore, or no step does.
    ValueError: not a cmim_jax training checkpoint.
  """
  from cmim_jax import checkpointing
  ckpt = checkpointing.Checkpointer(path, read_only=True)
  try:
    state, step = ckpt.restore_parts(("params", "batch_stats"), step)
  finally:
    ckpt.close()
  try:
    params = state["params"]["model"]
  except (KeyError, TypeError):
    raise ValueError(f"checkpoint {ckpt.directory}/{step} has no params/model; not a cmim_jax "
                     "training checkpoint.") from None
  variables = {"params": params, "batch_stats": state.get("batch_stats") or {}}
  if objectives:
    variables["objectives"] = state["params"].get("objectives") or {}
  return jax.tree.map(np.asarray, variables), int(step)


def _flat(tree: Mapping) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def check_shapes(variables: Mapping, expected: Mapping, *, what: str) -> None:
  """Raises ``ValueError`` naming the first leaf whose presence or shape differs."""
  got, want = _flat(variables), _flat(expected)
  for name in sorted(set(got) | set(want)):
    if name not in got or name not in want:
      raise ValueError(f"{what}: parameter {name!r} is {'missing' if name not in got else 'extra'} "
                       "compared with the model its config.json describes.")
    if tuple(got[name].shape) != tuple(want[name].shape):
      raise ValueError(f"{what}: parameter {name!r} has shape {tuple(got[name].shape)}, the model "
                       f"expects {tuple(want[name].shape)}.")


def merge_matching(target: Mapping, source: Mapping, *, what: str
                   ) -> tuple[dict, list[str], list[str]]:
  """``target`` with every leaf that ``source`` has under the same name.

  Args:
    target: a nested dict of arrays (the new run's initial variables).
    source: the same kind of dict from an earlier run.
    what: names the source in errors.

  Returns:
    ``(merged, new, unused)``: the merged tree, the names only ``target``
    has (kept at their initial values) and those only ``source`` has.

  Raises:
    ValueError: a name in both with different shapes.
  """
  flat_t, flat_s = _flat(target), _flat(source)
  merged = {}
  for name, value in flat_t.items():
    if name in flat_s:
      if tuple(np.shape(flat_s[name])) != tuple(np.shape(value)):
        raise ValueError(f"{what}: parameter {name!r} has shape {tuple(np.shape(flat_s[name]))} "
                         f"there and {tuple(np.shape(value))} in this model; the architectures "
                         "differ at that layer.")
      merged[name] = np.asarray(flat_s[name], dtype=np.asarray(value).dtype)
    else:
      merged[name] = value
  new = sorted(set(flat_t) - set(flat_s))
  unused = sorted(set(flat_s) - set(flat_t))
  out = traverse_util.unflatten_dict(merged, sep="/") if merged else {}
  return out, new, unused


def init_from(state, workdir: str):
  """``state`` with its model params and BatchNorm statistics taken from ``workdir``.

  Names present in both are copied (shapes must agree); what is new or left
  over is logged. Trainable objective heads, objective state and the
  optimizer state keep their initial values.
  """
  path = _check_workdir(workdir, "init_from")
  variables, step = restore_variables(path)
  what = f"config.init_from={workdir!r} (step {step})"
  params, new_p, unused_p = merge_matching(state.params["model"], variables["params"], what=what)
  stats, new_s, unused_s = merge_matching(state.batch_stats, variables["batch_stats"], what=what)
  logging.info("Initialised from %s: %d tensors copied; new here (initial values): %s; "
               "not used from there: %s.", what,
               len(_flat(params)) + len(_flat(stats)) - len(new_p) - len(new_s),
               new_p + [f"batch_stats/{n}" for n in new_s] or "none",
               unused_p + [f"batch_stats/{n}" for n in unused_s] or "none")
  return state.replace(params={**state.params, "model": params}, batch_stats=stats), {
      "new": new_p + [f"batch_stats/{n}" for n in new_s],
      "unused": unused_p + [f"batch_stats/{n}" for n in unused_s], "step": step}
