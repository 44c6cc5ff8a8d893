r"""Command line: train or evaluate a BNN from an ml_collections config file.

  python -m cmim_jax.main --config configs/cifar100.py --workdir runs/c100
  python -m cmim_jax.main --config configs/cifar10.py:smoke --workdir /tmp/smoke
  python -m cmim_jax.main --config configs/cifar10.py --workdir runs/c10 --mode eval \
      --config.data.eval_split='train[45000:]'

Multi-host: pass ``--coordinator_address host:port --num_processes N
--process_id i`` to every process (``launch/local.py`` does this on
localhost); on a Cloud TPU pod no flag is needed, JAX finds its peers.
"""

import logging as logging_lib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cmim_jax import xla_tuning

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (path[:argument]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (resuming from workdir); eval: evaluate the latest checkpoint.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Simulate this many CPU devices per process (testing).")

flags.mark_flags_as_required(["config", "workdir"])

_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")



def _init_distributed(jax) -> None:
  if _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
    missing = [n for n, f in (("--coordinator_address", _COORDINATOR),
                              ("--num_processes", _NUM_PROCESSES),
                              ("--process_id", _PROCESS_ID)) if f.value is None]
    if missing:
      raise ValueError(f"multi-host run needs {', '.join(missing)} as well.")
    # Only the CPU backend reads this: cross-process CPU collectives need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif any(len(os.environ.get(k, "").split(",")) > 1 for k in _TPU_POD_ENV):
    jax.distributed.initialize()  # Cloud TPU pod: peers come from the metadata.


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
  try:
    _init_distributed(jax)
    from cmim_jax import train  # pylint: disable=g-import-not-at-top
    logging.info("JAX process %d/%d, %d local / %d global devices (%s).",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count(), jax.default_backend())
    if _MODE.value == "train":
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
