"""A run's config: checking it against the defaults, and its copy in the workdir.

``validate_config`` raises before any work; ``save_run_config`` writes
``WORKDIR/config.json`` when training starts and ``load_run_config`` reads it
back (the exporter, teachers and ``init_from`` use it). Re-exported by
:mod:`cmim_jax.train`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

from cmim_jax import default_config
from cmim_jax import models
from cmim_jax import objectives as objectives_lib
from cmim_jax import optim
from cmim_jax import paths
from cmim_jax.parallel import Parallel

CONFIG_FILE = "config.json"  # In the workdir: the config of the latest run.


def _missing_keys(config: Mapping, reference: Mapping, prefix: str = "") -> list[str]:
  missing = []
  for key, value in reference.items():
    if key not in config:
      missing.append(prefix + key)
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], (ml_collections.ConfigDict, dict)):
      missing += _missing_keys(config[key], value, f"{prefix}{key}.")
  return missing


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first missing key or bad value.

  The keys a config must have are those of
  :func:`cmim_jax.default_config.get_config`, the one place they are defined.
  """
  missing = _missing_keys(config, default_config.get_config())
  if missing:
    raise ValueError(
        f"config has no key {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
        + "; build the config on cmim_jax.default_config.get_config() and override "
        "what differs.")
  def check(ok, key, value, want):
    if not ok:
      raise ValueError(f"config.{key}={value!r} is invalid: {want}.")
  check(config.batch_size > 0, "batch_size", config.batch_size, "must be > 0")
  check(config.num_epochs > 0 or config.num_train_steps > 0, "num_epochs",
        config.num_epochs, "num_epochs or num_train_steps must be > 0")
  check(config.learning_rate > 0, "learning_rate", config.learning_rate, "must be > 0")
  check(config.weight_decay >= 0, "weight_decay", config.weight_decay, "must be >= 0")
  check(config.optimizer in optim.OPTIMIZERS, "optimizer", config.optimizer,
        f"must be one of {optim.OPTIMIZERS}")
  check(config.cmim.weight >= 0, "cmim.weight", config.cmim.weight, "must be >= 0")
  check(config.cmim.temperature > 0, "cmim.temperature", config.cmim.temperature, "must be > 0")
  check(config.cmim.embed_dim > 0, "cmim.embed_dim", config.cmim.embed_dim, "must be > 0")
  check(config.kd.temperature > 0, "kd.temperature", config.kd.temperature, "must be > 0")
  _check_linear_probe(config.linear_probe, check)
  models.import_modules(config.imports)  # May register objectives.
  objectives_lib.resolve_weights(config)  # Names and weights.
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    check(config[key] > 0, key, config[key], "must be > 0")
  Parallel(config.parallel)  # validates the mode


def _check_linear_probe(section, check) -> None:
  """The ``linear_probe`` section (read by ``--mode linear_probe``)."""
  def whole(v):
    return isinstance(v, int) and not isinstance(v, bool)
  key = "linear_probe."
  check(whole(section.epochs) and section.epochs > 0, key + "epochs", section.epochs,
        "must be a whole number of epochs > 0")
  check(section.learning_rate > 0, key + "learning_rate", section.learning_rate, "must be > 0")
  check(0 <= section.momentum < 1, key + "momentum", section.momentum, "must be in [0, 1)")
  check(section.weight_decay >= 0, key + "weight_decay", section.weight_decay, "must be >= 0")
  check(whole(section.batch_size) and section.batch_size > 0, key + "batch_size",
        section.batch_size, "must be a whole number > 0")
  m = section.milestones
  check(isinstance(m, (tuple, list)) and all(whole(e) and e > 0 for e in m)
        and list(m) == sorted(set(m)), key + "milestones", m,
        "must be increasing whole epochs > 0, e.g. (60, 80), or () for a constant rate")
  check(isinstance(section.augment, bool), key + "augment", section.augment,
        "must be True or False")


def _to_tuples(tree: Any) -> Any:
  # JSON has no tuples; configs use them (stage_sizes, mean, std).
  if isinstance(tree, dict):
    return {k: _to_tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_to_tuples(v) for v in tree)
  return tree


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``config`` to ``workdir/config.json`` atomically; returns the path.

  ``workdir`` may be remote (``gs://``, :mod:`cmim_jax.paths`).
  """
  root = paths.resolve(workdir)
  root.mkdir(parents=True, exist_ok=True)
  path = root / CONFIG_FILE
  text = config.to_json(indent=2, sort_keys=True) + "\n"
  if paths.is_remote(workdir):
    path.write_text(text)  # An object store replaces an object whole.
  else:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)  # Readers see the old file or the new one, never half.
  return str(path)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the latest run in ``workdir`` (its ``config.json``).

  Args:
    workdir: a directory :func:`train_and_evaluate` trained in (local or ``gs://``).

  Returns:
    The config, tuples restored, as the run saw it after command-line overrides.

  Raises:
    FileNotFoundError: ``workdir`` holds no config.json.
  """
  path = paths.resolve(workdir, what="run directory") / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"no {CONFIG_FILE} in {workdir}; it is written when training starts "
        "(python -m cmim_jax.main --mode train), so point at a training workdir.")
  return ml_collections.ConfigDict(_to_tuples(json.loads(path.read_text())))
