"""One workdir, one run: a lock file naming the live run's host and pid.

Two trainings on one workdir would interleave ``metrics.jsonl`` and race on
the checkpoints, so the second one refuses to start (:class:`WorkdirLocked`,
one line naming the live run). A lock left behind by a run that died (same
host, pid gone; or a lock whose heartbeat stopped; or one left by an earlier
incarnation of the same SLURM job, which a requeue restarts on any node) is
taken over with a warning. Only process 0 of a multi-process run takes the lock: the run as a
whole owns the workdir.

The lock is created with an exclusive create (``O_EXCL``) on local disks. On
object stores (``gs://``) there is no exclusive create; the lock is written,
read back and compared, which catches all but a near-simultaneous start.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from cmim_jax import paths

LOCK_NAME = "RUNNING.lock"


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class RunLock:
  """``with RunLock(workdir): train(...)``; see the module docstring.

  Args:
    workdir: the run's directory (local or remote).
    heartbeat_s: how often the holder refreshes the lock's time stamp. A lock
      on another host is stale once it has not been refreshed for
      ``stale_after_s`` (the pid cannot be checked from here).
    stale_after_s: see above; default 10 heartbeats (10 minutes without heartbeat).
  """

  join_timeout_s = 5.0  # How long release() waits for the heartbeat thread to end.

  def __init__(self, workdir: str, *, heartbeat_s: float = 60.0,
               stale_after_s: float | None = None):
    self.workdir = workdir
    self.path = paths.resolve(workdir) / LOCK_NAME
    self.heartbeat_s = heartbeat_s
    if stale_after_s is None:
      stale_after_s = 10 * heartbeat_s if heartbeat_s > 0 else 600.0
    self.stale_after_s = stale_after_s
    self.token = uuid.uuid4().hex
    self.info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                 "started": time.time(), "heartbeat": time.time(),
                 "job": os.environ.get("SLURM_JOB_ID", "")}
    self._stop = threading.Event()
    # The heartbeat's check-and-rewrite and release's unlink exclude each
    # other: a heartbeat that had passed its stop check when release() came
    # would otherwise write the lock again after release() deleted it.
    self._mutex = threading.Lock()
    self._thread = None
    self.held = False

  def describe(self, info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')} (started {started})"

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # Cut short or unreadable: a run died while writing it.

  def _is_stale(self, info: dict) -> bool:
    if not info:
      return True
    if self.info["job"] and info.get("job") == self.info["job"]:
      return True  # This job, requeued: the earlier run is gone, wherever it ran.
    if info.get("host") == socket.gethostname():
      return not _pid_alive(int(info.get("pid", -1)))
    return time.time() - float(info.get("heartbeat", 0)) > self.stale_after_s

  def _write_exclusive(self) -> bool:
    data = json.dumps(self.info)
    if paths.is_remote(self.workdir):
      if self.path.exists():
        return False
      self.path.write_text(data)
      return (self._read() or {}).get("token") == self.token
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(data)
    return True

  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirLocked`."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # Retries only after removing a stale lock.
      if self._write_exclusive():
        self.held = True
        break
      other = self._read()
      if other is None:
        continue  # Released in between.
      if not self._is_stale(other):
        raise WorkdirLocked(
            f"workdir {self.workdir} is in use by another run: {self.describe(other)}; "
            f"stop it first, or use another --workdir (lock file: {self.path}).")
      logging.warning("Taking over the lock of a run that is gone (%s): %s",
                      self.describe(other) if other else "unreadable lock", self.path)
      self.path.unlink(missing_ok=True)
    else:
      raise WorkdirLocked(f"could not take the lock {self.path}; another run is starting "
                          "on the same workdir.")
    if self.heartbeat_s > 0:
      self._thread = threading.Thread(target=self._beat, daemon=True, name="runlock")
      self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with self._mutex:
        if self._stop.is_set():  # Released while this thread waited for the mutex.
          return
        current = self._read()
        if current and current.get("token") != self.token:
          logging.error("The run lock %s was taken by %s.", self.path, self.describe(current))
          return
        self.info["heartbeat"] = time.time()
        try:
          self._rewrite(json.dumps(self.info))
        except OSError as e:  # A full disk must not stop training.
          logging.warning("Could not refresh the run lock %s: %s", self.path, e)

  def _rewrite(self, data: str) -> None:
    """Replaces the lock's contents so that a reader never sees it half-written
    (a cut-short lock counts as stale)."""
    if paths.is_remote(self.workdir):
      self.path.write_text(data)  # An object store replaces an object whole.
      return
    tmp = f"{self.path}.{self.token}"
    with open(tmp, "w") as f:
      f.write(data)
    os.replace(tmp, self.path)

  def release(self) -> None:
    self._stop.set()
    # Under the mutex: a heartbeat write in progress finishes first, and none
    # starts after it (each checks _stop under the mutex), however long the
    # heartbeat thread goes unscheduled on a loaded machine. The join below
    # only tidies up; the lock file no longer depends on it.
    with self._mutex:
      if self.held:
        current = self._read()
        if current and current.get("token") == self.token:
          self.path.unlink(missing_ok=True)
        self.held = False
    if self._thread is not None:
      self._thread.join(timeout=self.join_timeout_s)
      self._thread = None

  def __enter__(self) -> "RunLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
