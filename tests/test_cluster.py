"""Preemption and dead peers on localhost: SIGTERM -> one checkpoint step on every process, exit 0;
a killed or hung peer -> the others exit non-zero with one line naming it, in bounded time.

Every run is bounded (``timeout``); the processes run tests/_cluster_child.py, a small loop with a
collective every step, the run lock-free core of what cmim_jax.main does.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cmim_jax import checkpointing
from cmim_jax import cluster
from cmim_jax import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "_cluster_child.py")
pytestmark = pytest.mark.multiprocess


def free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Run:
  """``n`` child processes on one workdir; output kept per process."""

  def __init__(self, tmp_path, workdir, n=2, peer_timeout=10, max_steps=100000, state_mb=0):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    self.logs = [tmp_path / f"p{i}.{time.time_ns()}.log" for i in range(n)]
    self.procs = [
        subprocess.Popen([sys.executable, "-u", CHILD, str(i), str(n), str(port), str(workdir),
                          str(peer_timeout), str(max_steps), str(state_mb)],
                         env=env, stdout=open(self.logs[i], "w"), stderr=subprocess.STDOUT)
        for i in range(n)]

  def out(self, i):
    return self.logs[i].read_text()

  def wait_for(self, text, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
      if all(text in self.out(i) for i in range(len(self.procs))):
        return
      if any(p.poll() is not None for p in self.procs):
        break
      time.sleep(0.05)
    self.kill()
    raise AssertionError(f"no {text!r} in every log:\n" + "\n".join(
        self.out(i)[-2000:] for i in range(len(self.procs))))

  def wait(self, timeout=60):
    try:
      return [p.wait(timeout=timeout) for p in self.procs]
    finally:
      self.kill()

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_single_process_handler_records_and_defers_signals():
  handler = preemption.PreemptionHandler().install()
  try:
    assert not handler.multi_process and not handler.reached(5)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.reached(6) and handler.signal_name == "SIGTERM"
    os.kill(os.getpid(), signal.SIGINT)  # During the save: logged, not raised.
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.signal_name == "SIGTERM"
    assert "saved the checkpoint of step 6 in /w" in handler.exit_line(6, "/w")
  finally:
    handler.uninstall()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_to_one_process_saves_one_step_everywhere(tmp_path):
  workdir = tmp_path / "run"
  run = Run(tmp_path, workdir)
  run.wait_for("training")
  t0 = time.monotonic()
  run.procs[1].send_signal(signal.SIGTERM)  # A notice to one process reaches both.
  codes = run.wait()
  seconds = time.monotonic() - t0
  assert codes == [0, 0], run.out(0) + run.out(1)
  steps = [int(re.search(r"Preempted \(SIGTERM\): saved the checkpoint of step (\d+)",
                         run.out(i)).group(1)) for i in range(2)]
  assert steps[0] == steps[1] and steps[0] >= 3
  print(f"SIGTERM -> exit of both processes: {seconds:.2f} s, checkpoint step {steps[0]}")
  assert checkpointing.Checkpointer(str(workdir)).all_steps() == [steps[0]]
  restored = checkpointing.Checkpointer(str(workdir)).restore(
      {"w": np.zeros((4,), np.float32), "big": np.zeros((1,), np.float32)})
  # w counts the steps taken: the checkpoint holds the state of exactly that step.
  np.testing.assert_array_equal(restored["w"], np.full((4,), float(steps[0])))
  # (Resuming from it is tested end to end in tests/test_main_cluster.py.)


def test_second_signal_during_the_save_leaves_a_complete_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  run = Run(tmp_path, workdir, n=1, state_mb=48)
  run.wait_for("training")
  proc = run.procs[0]
  proc.send_signal(signal.SIGTERM)
  deadline = time.time() + 30
  while "SIGTERM received" not in run.out(0) and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(0.05)  # Inside the save of 48 MB.
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGINT)
  assert run.wait() == [0], run.out(0)
  out = run.out(0)
  assert "received again" in out and "Traceback" not in out
  step = int(re.search(r"saved the checkpoint of step (\d+)", out).group(1))
  ckpt = checkpointing.Checkpointer(str(workdir))
  assert ckpt.all_steps() == [step]
  target = {"w": np.zeros((4,), np.float32), "big": np.zeros((48 * 2**18,), np.float32)}
  np.testing.assert_array_equal(ckpt.restore(target)["w"], np.full((4,), float(step)))


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_peer_is_named_and_the_survivor_exits(tmp_path, victim):
  run = Run(tmp_path, tmp_path / "run", peer_timeout=10)
  run.wait_for("training")
  t0 = time.monotonic()
  run.procs[victim].kill()
  survivor = 1 - victim
  code = run.procs[survivor].wait(timeout=30)
  seconds = time.monotonic() - t0
  run.kill()
  out = run.out(survivor)
  assert code == cluster.EXIT_PEER_LOST, out
  lines = [l for l in out.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and f"error: process {victim}" in lines[0] and "exited" in lines[0]
  assert ("(the coordinator)" in lines[0]) == (victim == 0)
  assert "core dumped" not in out and "Check failure stack trace" not in out.split(lines[0])[-1]
  print(f"kill -9 of process {victim} -> survivor exit: {seconds:.2f} s")
  assert seconds < 10  # Seen at once: well inside the 10 s silence bound.


def test_hung_peer_is_given_up_after_the_timeout(tmp_path):
  run = Run(tmp_path, tmp_path / "run", peer_timeout=2)
  run.wait_for("training")
  t0 = time.monotonic()
  run.procs[1].send_signal(signal.SIGSTOP)  # Alive but silent, like a host that froze.
  try:
    code = run.procs[0].wait(timeout=30)
  finally:
    run.procs[1].send_signal(signal.SIGCONT)
    run.kill()
  seconds = time.monotonic() - t0
  assert code == cluster.EXIT_PEER_LOST, run.out(0)
  assert "error: process 1 of 2" in run.out(0) and "sent nothing for" in run.out(0)
  print(f"hung peer, --peer_timeout_s=2 -> survivor exit: {seconds:.2f} s")
  assert 2 - 0.5 <= seconds < 8  # silence counts from the last heartbeat (every 0.5 s)
