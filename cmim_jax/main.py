r"""Command line: train or evaluate a BNN from an ml_collections config file.

  python -m cmim_jax.main --config configs/cifar100.py --workdir runs/c100
  python -m cmim_jax.main --config configs/cifar10.py:smoke --workdir /tmp/smoke
  python -m cmim_jax.main --config configs/cifar10.py --workdir runs/c10 --mode eval \
      --config.data.eval_split='train[45000:]'
  python -m cmim_jax.main --config configs/cifar10.py --workdir runs/c10 --mode linear_probe

Multi-host: pass ``--coordinator_address host:port --num_processes N
--process_id i`` to every process (``launch/local.py`` does this on
localhost); on a Cloud TPU pod or in a SLURM job (``launch/slurm.py``) no
flag is needed, JAX finds its peers. SIGTERM saves a checkpoint on every
process and exits 0; a dead peer stops the others with exit code 3 (see
README, "Running on clusters").
"""

import logging as logging_lib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cmim_jax import cluster
from cmim_jax import paths
from cmim_jax import runlock
from cmim_jax import xla_tuning

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (path[:argument]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "linear_probe"],
                          "train: train (resuming from workdir); eval: evaluate the latest "
                          "checkpoint; linear_probe: train a linear classifier on its frozen "
                          "features (config.linear_probe, resuming) and report held-out top-1.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Simulate this many CPU devices per process (testing).")
_PEER_TIMEOUT = flags.DEFINE_float(
    "peer_timeout_s", 60.0, "Multi-process runs: stop when a peer has been silent this long "
    "(a peer that dies is noticed at once); 0 turns the watchdog off.")

flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message says what is wrong and how to fix it: one line, no traceback.
_USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, runlock.WorkdirLocked,
                paths.RemotePathError)


class _QuietLibraries:
  """Drops INFO lines of orbax's (one per file written) from the log."""

  def filter(self, record) -> bool:
    return record.levelno > logging_lib.INFO or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  xla_tuning.apply()  # Before the first use of a JAX backend.
  import jax  # pylint: disable=g-import-not-at-top
  xla_tuning.enable_compilation_cache()  # Later runs load compiled steps from disk.
  if _NUM_CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _NUM_CPU_DEVICES.value)
  multi_process = False
  try:
    multi_process = cluster.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, peer_timeout_s=_PEER_TIMEOUT.value)
    from cmim_jax import loop  # pylint: disable=g-import-not-at-top
    logging.info("JAX process %d/%d, %d local / %d global devices (%s).",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend())
    if _MODE.value == "train":
      loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "linear_probe":
      from cmim_jax import linear_probe  # pylint: disable=g-import-not-at-top
      linear_probe.run(_CONFIG.value, _WORKDIR.value)
    else:
      loop.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  except (ValueError, OSError, ImportError, FloatingPointError, RuntimeError) as e:
    if multi_process:
      # A collective that failed because a peer died: let the watchdog name it.
      cluster.wait_for_peer_verdict(5.0)
    if not isinstance(e, _USER_ERRORS):
      raise
    # Printed once (the absl log would repeat it on stderr).
    print(f"error: {e}", file=sys.stderr, flush=True)
    _finish(1, multi_process, error=True)
  _finish(0, multi_process)


def _finish(code: int, multi_process: bool, *, error: bool = False) -> None:
  if not multi_process:
    sys.exit(code)
  cluster.finish(error=error)
  if not error:
    return  # JAX's shutdown barrier: every process gets there.
  # The peers stop on this process's error notice instead of reaching JAX's
  # shutdown barrier, which would hold this one for minutes and then abort.
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
