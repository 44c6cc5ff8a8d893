"""Atomic, resumable checkpoints through orbax's CheckpointManager.

Orbax writes each checkpoint into a temporary directory and renames it only
once every file is complete, so a process killed during a save leaves the
previous checkpoint as the latest restorable one (``tests/test_checkpointing.py``
kills a save half-way to check it).

A checkpoint can still be damaged afterwards (a disk that filled, bit rot, a
copy cut short). :meth:`Checkpointer.restore` then falls back to the newest
step that restores, warns naming the damaged step and moves it aside to
``workdir/checkpoints.damaged/`` (kept, not deleted). When no step restores
it raises :class:`CheckpointError`, one line saying what failed and what to do.
The workdir may be remote (``gs://``, see :mod:`cmim_jax.paths`).

``Checkpointer(workdir, read_only=True)`` is for readers of a run that may
still be training (the packed export): it creates, cleans and moves nothing,
and falls back past a damaged step with the same warning but leaves it in
place. :meth:`Checkpointer.restore_parts` restores some top-level entries of
the state (``params``, ``batch_stats``) without the rest (the optimizer
state) and without a target: their structure comes from the checkpoint.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cmim_jax import paths

DAMAGED_DIR = "checkpoints.damaged"


class CheckpointError(ValueError):
  """No checkpoint can be restored (damaged, or written for another config)."""


def _reason(e: BaseException) -> str:
  """The first line of an error, short enough for one log line."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= 240 else text[:237] + "..."


def _quiet_closed_loop_callbacks() -> None:
  """Drops the "Event loop is closed" errors of reads cancelled by a failed restore.

  When one array of a checkpoint fails to read, orbax closes its event loop
  while tensorstore still completes the other reads; each completion then
  reports ``RuntimeError('Event loop is closed')`` through
  ``sys.unraisablehook``, one traceback per array. They say nothing about the
  damage, which the warning already names; every other unraisable error
  still reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_cmim_jax_filter", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and (
        str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous(unraisable)

  hook._cmim_jax_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _read_only_options() -> ocp.CheckpointManagerOptions:
  # Every field read_only contradicts set to agree with it (orbax warns otherwise).
  return ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                      max_to_keep=None, save_interval_steps=0)


class Checkpointer:
  """Saves the train state every N steps and at the end, keeps the last K."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    """Opens ``workdir/checkpoints``.

    Args:
      workdir: the run directory, local or remote.
      keep: checkpoints kept (older ones are deleted when saving).
      async_save: write in a background thread.
      read_only: never write: no directory is created, no stale temporary
        directory removed (it may be a save in progress of a running run),
        no damaged step moved aside.

    Raises:
      FileNotFoundError: ``read_only`` and there is no ``checkpoints/``.
    """
    root = paths.resolve(workdir)
    self.directory = root / "checkpoints"
    self.damaged_directory = root / DAMAGED_DIR
    self.read_only = read_only
    self._reader = None
    if read_only:
      if not self.directory.is_dir():
        raise FileNotFoundError(self._no_checkpoint())
      options = _read_only_options()
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    # Orbax scans for stale temporary directories in a background thread; a
    # run that stops right away (eval without a checkpoint, a config error)
    # would otherwise exit under that thread and print its traceback.
    settle = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if settle is not None:
      settle()

  def _no_checkpoint(self) -> str:
    return (f"no checkpoint in {self.directory}; train first (--mode train) or point "
            "--workdir at a directory holding checkpoints/.")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    if self.read_only:
      # Orbax would skip the save without a word.
      raise ValueError(f"this Checkpointer of {self.directory} is read-only; open it with "
                       "read_only=False to save.")
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def _restore_step(self, target: Any, step: int) -> Any:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores ``step`` (default: the newest intact one) into the structure of ``target``.

    Raises:
      FileNotFoundError: there is no checkpoint at all.
      CheckpointError: ``step`` was given and does not restore, or no step does.
    """
    return self._restore_newest(lambda s: self._restore_step(target, s), step)[0]

  def restore_parts(self, parts: Sequence[str] = ("params", "batch_stats"),
                    step: int | None = None) -> tuple[dict, int]:
    """Restores only the top-level entries ``parts`` of the saved state.

    No target is needed: the structure, shapes and dtypes are read from the
    checkpoint, and the arrays come back as NumPy arrays. The other entries
    (the optimizer state) are not read. A damaged newest step falls back to
    the newest intact one as :meth:`restore` does.

    Args:
      parts: top-level keys of the saved state; a key the checkpoint lacks
        is left out of the result (e.g. ``batch_stats`` of a model without
        BatchNorm).
      step: the step to restore (default: the newest intact one).

    Returns:
      ``({part: tree}, step restored)``.

    Raises:
      FileNotFoundError: there is no checkpoint at all.
      CheckpointError: ``step`` was given and does not restore, or no step does.
    """
    return self._restore_newest(lambda s: self._restore_parts_step(parts, s), step)

  def _restore_parts_step(self, parts: Sequence[str], step: int) -> dict:
    if self._reader is None:
      # The state is saved with StandardSave; restoring a subtree needs the
      # PyTree handler's partial restore (same files), so a second,
      # read-only manager reads them.
      self._reader = ocp.CheckpointManager(
          self.directory, item_handlers=ocp.PyTreeCheckpointHandler(),
          options=_read_only_options())
    else:
      self._reader.reload()
    metadata = self._reader.item_metadata(step)
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict):
      raise ValueError(f"the saved state is a {type(tree).__name__}, not a dict of parts")
    item = {k: tree[k] for k in parts if k in tree}
    if not item:
      raise ValueError(f"the saved state has none of {list(parts)} (it has {sorted(tree)})")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    return self._reader.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))

  def _restore_newest(self, restore_step: Callable[[int], Any],
                      step: int | None) -> tuple[Any, int]:
    """``(restore_step(s), s)`` for ``step``, or for the newest ``s`` that restores."""
    _quiet_closed_loop_callbacks()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(self._no_checkpoint())
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; "
                              f"the steps there are {steps}.")
      try:
        return restore_step(step), step
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} does not restore ({_reason(e)}); "
            f"choose another of the steps {steps}.") from None
    failures: list[tuple[int, str]] = []
    for s in reversed(steps):
      try:
        restored = restore_step(s)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((s, _reason(e)))
        continue
      if failures:
        # An older step restored into the same target, so the newer ones
        # failed for their contents, not because the config changed.
        if self.read_only:
          self._warn_damaged(failures, restored_step=s)
        else:
          self._set_aside(failures, restored_step=s)
      return restored, s
    listed = "; ".join(f"step {s}: {r}" for s, r in failures)
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores ({listed}). If the config changed "
        "since they were written, run with the old config or a new --workdir; if they are "
        f"damaged, move them out of {self.directory} to start over.")

  def _warn_damaged(self, failures: list[tuple[int, str]], *, restored_step: int) -> None:
    for s, reason in failures:
      logging.warning(
          "Checkpoint step %d in %s is damaged (%s); using step %d instead. The damaged "
          "one is left in place (read-only).", s, self.directory, reason, restored_step)

  def _set_aside(self, failures: list[tuple[int, str]], *, restored_step: int) -> None:
    moved = []
    if jax.process_index() == 0:
      self.damaged_directory.mkdir(parents=True, exist_ok=True)
      for s, _ in failures:
        dest = self.damaged_directory / str(s)
        if dest.exists():
          dest = self.damaged_directory / f"{s}.{int(time.time())}"
        (self.directory / str(s)).rename(dest)
        moved.append(dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("cmim_jax_checkpoint_set_aside")
    self.manager.reload()
    for (s, reason), dest in zip(failures, moved or [None] * len(failures)):
      logging.warning(
          "Checkpoint step %d in %s is damaged (%s); resuming from step %d instead. "
          "The damaged one is kept in %s.", s, self.directory, reason, restored_step,
          dest or self.damaged_directory)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self._reader is not None:
      self._reader.close()
