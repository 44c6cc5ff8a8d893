"""One workdir, one run: the lock names the live run; a dead run's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
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
    time.sleep(0.3)
    assert json.loads(lock_file(tmp_path).read_text())["heartbeat"] > first


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
