"""A small multi-process training loop for tests/test_cluster.py (not a test module).

  python tests/_cluster_child.py PROCESS_ID NUM_PROCESSES PORT WORKDIR PEER_TIMEOUT_S MAX_STEPS [STATE_MB]

With one process there is no jax.distributed and no collective.
"""
import sys
import time

import numpy as np

from cmim_jax import checkpointing
from cmim_jax import cluster
from cmim_jax import preemption


def main():
  pid, n, port, workdir, peer_timeout, max_steps = sys.argv[1:7]
  state_mb = float(sys.argv[7]) if len(sys.argv) > 7 else 0
  if int(n) > 1:
    cluster.initialize(coordinator_address=f"localhost:{port}", num_processes=int(n),
                       process_id=int(pid), peer_timeout_s=float(peer_timeout))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  handler = preemption.PreemptionHandler().install()
  ckpt = checkpointing.Checkpointer(workdir)
  # "big" makes the save long enough to signal the process again during it.
  state = {"w": np.zeros((4,), np.float32),
           "big": np.random.default_rng(0).random(max(1, int(state_mb * 2**18)), np.float32)}
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(state)
  print(f"start {start} w {float(state['w'][0])}", flush=True)
  try:
    loop(handler, ckpt, state, start, int(n), int(max_steps), multihost_utils)
  except Exception:  # pylint: disable=broad-except
    cluster.wait_for_peer_verdict(5.0)  # A failed collective: did a peer die?
    raise


def loop(handler, ckpt, state, start, n, max_steps, multihost_utils):
  for step in range(start, max_steps):
    if n > 1:  # A collective every step, as in training: the peers must be in step.
      total = multihost_utils.process_allgather(np.array([step])).sum()
      assert total == n * step
    state = {"w": state["w"] + 1, "big": state["big"]}
    done = step + 1
    if done - start == 3:
      print("training", flush=True)
    if handler.reached(done):
      ckpt.save(done, state)
      ckpt.close()
      print(handler.exit_line(done, ckpt.directory), flush=True)
      cluster.finish()
      sys.exit(0)
    time.sleep(0.02)
  ckpt.save(max_steps, state)
  ckpt.close()
  print(f"finished w {float(state['w'][0])}", flush=True)
  cluster.finish()


if __name__ == "__main__":
  main()
