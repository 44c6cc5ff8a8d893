"""One workdir, one run: the lock names the live run; a dead run's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from cmim_jax import runlock


def lock_file(workdir):
  return workdir / runlock.LOCK_NAME


def test_second_run_is_refused_naming_the_live_one(tmp_path):
  with runlock.RunLock(str(tmp_path), heartbeat_s=0):
    info = json.loads(lock_file(tmp_path).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(runlock.WorkdirLocked) as e:
      runlock.RunLock(str(tmp_path), heartbeat_s=0).acquire()
    message = str(e.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "--workdir" in message and "\n" not in message
  assert not lock_file(tmp_path).exists()  # released on exit


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  pid = int(dead.stdout)
  lock_file(tmp_path).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": pid, "started": time.time(), "heartbeat": time.time()}))
  with runlock.RunLock(str(tmp_path), heartbeat_s=0) as lock:
    assert json.loads(lock_file(tmp_path).read_text())["token"] == lock.token


def test_cut_short_lock_is_taken_over(tmp_path):
  lock_file(tmp_path).write_text('{"host": "x", "pi')
  with runlock.RunLock(str(tmp_path), heartbeat_s=0) as lock:
    assert json.loads(lock_file(tmp_path).read_text())["pid"] == os.getpid()
    assert lock.held


def test_other_host_lock_is_stale_only_once_its_heartbeat_stopped(tmp_path):
  fresh = {"host": "other-node", "pid": 1, "started": time.time(), "heartbeat": time.time()}
  lock_file(tmp_path).write_text(json.dumps(fresh))
  with pytest.raises(runlock.WorkdirLocked, match="other-node"):
    runlock.RunLock(str(tmp_path), heartbeat_s=0, stale_after_s=60).acquire()
  old = dict(fresh, heartbeat=time.time() - 120)
  lock_file(tmp_path).write_text(json.dumps(old))
  with runlock.RunLock(str(tmp_path), heartbeat_s=0, stale_after_s=60):
    assert json.loads(lock_file(tmp_path).read_text())["host"] == socket.gethostname()


def test_heartbeat_refreshes_the_lock(tmp_path):
  with runlock.RunLock(str(tmp_path), heartbeat_s=0.05):
    first = json.loads(lock_file(tmp_path).read_text())["heartbeat"]
    # Polled, not one fixed sleep: on a loaded machine the heartbeat thread
    # may wait seconds for a CPU (~0.05 s idle).
    deadline = time.monotonic() + 60
    while (json.loads(lock_file(tmp_path).read_text())["heartbeat"] == first
           and time.monotonic() < deadline):
      time.sleep(0.02)
    assert json.loads(lock_file(tmp_path).read_text())["heartbeat"] > first


def test_a_heartbeat_in_progress_never_writes_the_lock_back_after_release(tmp_path, monkeypatch):
  """A heartbeat thread that goes unscheduled past release()'s wait for it (a
  loaded machine) used to write the lock again after release() deleted it:
  the workdir then looked in use by this (live) process."""
  entered, go = threading.Event(), threading.Event()
  rewrite = runlock.RunLock._rewrite  # pylint: disable=protected-access

  def slow_rewrite(self, data):
    entered.set()
    go.wait(10)  # The heartbeat stalls here, past its stop check.
    rewrite(self, data)

  monkeypatch.setattr(runlock.RunLock, "_rewrite", slow_rewrite)
  monkeypatch.setattr(runlock.RunLock, "join_timeout_s", 0.05)  # release() gives up on it early.
  lock = runlock.RunLock(str(tmp_path), heartbeat_s=0.01)
  lock.acquire()
  beat = lock._thread  # pylint: disable=protected-access
  assert entered.wait(60)
  releaser = threading.Thread(target=lock.release)
  releaser.start()
  releaser.join(0.3)  # Past join_timeout_s: the stalled write comes after release() gave up.
  go.set()
  releaser.join(60)
  beat.join(60)
  assert not releaser.is_alive() and not beat.is_alive()
  assert not lock_file(tmp_path).exists() and not lock.held


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
  """A requeue restarts the job, maybe on another node, before the old lock goes stale."""
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  fresh = {"host": "other-node", "pid": 1, "started": time.time(), "heartbeat": time.time(),
           "job": "4242"}
  lock_file(tmp_path).write_text(json.dumps(fresh))
  with runlock.RunLock(str(tmp_path), heartbeat_s=0):
    assert json.loads(lock_file(tmp_path).read_text())["pid"] == os.getpid()
  lock_file(tmp_path).write_text(json.dumps(dict(fresh, job="777")))  # another job: live
  with pytest.raises(runlock.WorkdirLocked, match="other-node"):
    runlock.RunLock(str(tmp_path), heartbeat_s=0).acquire()
