"""Preemption: on SIGTERM every process saves a checkpoint at the same step and exits 0.

Schedulers (Cloud TPU, SLURM, Kubernetes) send SIGTERM some time before they
take the machines. The train loop asks :meth:`PreemptionHandler.reached`
after every step:

* In a multi-process run, JAX's preemption service owns SIGTERM (its notifier
  is installed by ``jax.distributed.initialize``): the notice reaches every
  process, they agree on one step (``multihost_utils.reached_preemption_sync_point``,
  what orbax's ``CheckpointManager.reached_preemption`` uses) and all of them
  save that step. SIGINT (Ctrl-C) is turned into the same notice.
* In a single process, a Python handler records the signal; the loop saves
  after the step it is in.

After the first signal, further SIGTERM/SIGINT are only logged, so the save
is never cut: the workdir keeps only complete checkpoints (orbax writes to a
temporary directory and renames it at the end in any case).
"""

from __future__ import annotations

import os
import signal
import time

from absl import logging

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _multi_process_sync() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return (jax.process_count() > 1
          and distributed.global_state.preemption_sync_manager is not None)


class PreemptionHandler:
  """``install()`` at the start of training, ``reached(step)`` after every step.

  Attributes:
    signal_name: the first signal received (``'SIGTERM'``, ``'SIGINT'``), or None.
    received_at: ``time.monotonic()`` of the first signal, for the exit log line.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self.received_at: float | None = None
    self.multi_process = False
    self._previous: dict = {}

  def install(self) -> "PreemptionHandler":
    self.multi_process = _multi_process_sync()
    # JAX's notifier holds SIGTERM in multi-process runs; replacing it would
    # stop the notice from reaching the other processes.
    mine = (signal.SIGINT,) if self.multi_process else _SIGNALS
    for sig in mine:
      self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _on_signal(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      logging.warning("%s received again: the checkpoint is being saved; the run exits "
                      "once it is complete.", name)
      return
    self.signal_name, self.received_at = name, time.monotonic()
    logging.warning("%s received: saving a checkpoint after the current step, then exiting.",
                    name)
    if self.multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # The notice every process agrees on.

  def reached(self, step: int) -> bool:
    """Whether to save ``step`` and stop now (every process gets the same answer)."""
    if self.multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        if self.signal_name is None:  # The signal went to JAX's notifier, or to a peer.
          self.signal_name = "SIGTERM"
        return True
      return False
    return self.signal_name is not None

  def exit_line(self, step: int, directory) -> str:
    waited = f" {time.monotonic() - self.received_at:.1f} s after the signal" if (
        self.received_at is not None) else ""
    return (f"Preempted ({self.signal_name}): saved the checkpoint of step {step} in "
            f"{directory}{waited}; exiting with status 0. Run the same command to resume.")
