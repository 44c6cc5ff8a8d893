"""Atomic, resumable checkpoints through orbax's CheckpointManager.

Orbax writes each checkpoint into a temporary directory and renames it only
once every file is complete, so a process killed during a save leaves the
previous checkpoint as the latest restorable one (``tests/test_train.py``
kills a save half-way to check it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves the train state every N steps and at the end, keeps the last K."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores ``step`` (default latest) into the structure/shardings of ``target``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"no checkpoint in {self.directory}; train first (--mode train) or point "
          "--workdir at a directory holding checkpoints/.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
