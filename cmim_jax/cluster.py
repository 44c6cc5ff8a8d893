"""Multi-process runs: start ``jax.distributed`` and watch that every peer stays alive.

:func:`initialize` connects the processes of a run: from explicit flags
(``--coordinator_address``, ``--num_processes``, ``--process_id``, as
``launch/local.py`` passes them), or from the environment on a Cloud TPU pod
or in a SLURM job (``launch/slurm.py``), where JAX reads its peers itself.

When a process dies (``kill -9``, a node lost), the others would block in a
collective, print a Gloo traceback, wait for JAX's shutdown barrier and
abort with a core dump. :class:`PeerWatchdog` instead keeps one TCP
connection to every peer and a heartbeat on it: a peer whose connection
closes (its process died) or that sends nothing for ``timeout_s`` (its host
hangs or dropped off the network) is reported in one line naming it, and
this process exits with :data:`EXIT_PEER_LOST` at once.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time

from absl import logging

EXIT_PEER_LOST = 3

_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
_KEY = "cmim_jax/peer_watchdog/"
_HEARTBEAT, _BYE, _ERROR = b"h", b"B", b"E"

_watchdog: "PeerWatchdog | None" = None


def detect() -> str | None:
  """``'tpu_pod'``, ``'slurm'`` (more than one task) or ``None``."""
  if any(len(os.environ.get(k, "").split(",")) > 1 for k in _TPU_POD_ENV):
    return "tpu_pod"
  if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and (
      "SLURM_STEP_NODELIST" in os.environ):
    return "slurm"
  return None


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, peer_timeout_s: float = 60.0,
               initialization_timeout_s: int = 300) -> bool:
  """Starts ``jax.distributed`` when this is a multi-process run; returns whether it is.

  Args:
    coordinator_address: ``host:port`` of process 0 (explicit multi-process run).
    num_processes: number of processes (explicit run).
    process_id: index of this process (explicit run).
    peer_timeout_s: how long a silent peer is waited for before this process
      stops (0 turns the watchdog off). A peer that dies is noticed at once.
    initialization_timeout_s: how long to wait for every peer to connect.

  Raises:
    ValueError: some but not all of the explicit flags are given.
  """
  import jax  # pylint: disable=g-import-not-at-top
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  found = None if explicit else detect()
  if not explicit and found is None:
    return False
  if explicit:
    missing = [n for n, v in (("--coordinator_address", coordinator_address),
                              ("--num_processes", num_processes),
                              ("--process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"multi-process run needs {', '.join(missing)} as well.")
  # Only the CPU backend reads this: cross-process CPU collectives need gloo.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX's own failure detector must not fire before the watchdog, which names
  # the dead process and exits cleanly.
  heartbeat = max(100, int(2 * peer_timeout_s) + 10)
  kwargs = dict(initialization_timeout=initialization_timeout_s,
                heartbeat_timeout_seconds=heartbeat)
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)  # Peers from the TPU metadata / SLURM environment.
  logging.info("jax.distributed: process %d of %d (%s).", jax.process_index(),
               jax.process_count(), found or "explicit flags")
  if peer_timeout_s > 0 and jax.process_count() > 1:
    start_watchdog(peer_timeout_s)
  return True


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def start_watchdog(timeout_s: float) -> "PeerWatchdog":
  global _watchdog
  import jax  # pylint: disable=g-import-not-at-top
  _watchdog = PeerWatchdog(_client(), jax.process_index(), jax.process_count(), timeout_s)
  _watchdog.start()
  return _watchdog


def watchdog() -> "PeerWatchdog | None":
  return _watchdog


def finish(*, error: bool = False) -> None:
  """Tells the peers this process ends on purpose (``error``: after its own error line)."""
  if _watchdog is not None:
    _watchdog.stop(error=error)


def wait_for_peer_verdict(seconds: float) -> None:
  """After a failed collective: give the watchdog ``seconds`` to name a dead peer.

  If it finds one, it exits the process with its line; otherwise this returns
  and the caller reports its own error.
  """
  if _watchdog is not None:
    _watchdog.verdict.wait(seconds)


def _outbound_ip(coordinator_host: str) -> str:
  """This host's address on the route to the coordinator (what peers can reach)."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    try:
      s.connect((coordinator_host, 9))
      return s.getsockname()[0]
    except OSError:
      return socket.gethostbyname(socket.gethostname())


class PeerWatchdog:
  """One TCP connection to every peer, heartbeats on it; exits when a peer is lost.

  Args:
    client: the ``jax.distributed`` client (its key-value store publishes addresses).
    process_id: this process.
    num_processes: all processes.
    timeout_s: silence after which a peer counts as lost.
    exit_fn: called with the exit code after the line is written (tests).
  """

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float,
               exit_fn=os._exit):  # pylint: disable=protected-access
    self.client, self.me, self.n = client, process_id, num_processes
    self.timeout_s = float(timeout_s)
    self.interval = min(1.0, self.timeout_s / 4)
    self.exit_fn = exit_fn
    self.verdict = threading.Event()
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._socks: dict[int, socket.socket] = {}
    self._hosts: dict[int, str] = {}
    self._thread = None

  # -- set-up ---------------------------------------------------------------
  def start(self) -> None:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    coordinator = (distributed.global_state.coordinator_address or "localhost:0").rsplit(":", 1)[0]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 0))
    listener.listen(self.n)
    ip = _outbound_ip(coordinator.strip("[]"))
    host = socket.gethostname()
    self.client.key_value_set(f"{_KEY}{self.me}", f"{ip}:{listener.getsockname()[1]}:{host}")
    timeout_ms = 120_000
    for j in range(self.n):
      if j == self.me:
        continue
      ip_j, port_j, host_j = self.client.blocking_key_value_get(f"{_KEY}{j}", timeout_ms).split(":", 2)
      self._hosts[j] = host_j
      if j < self.me:  # The higher index connects; the lower one accepts.
        s = socket.create_connection((ip_j, int(port_j)), timeout=timeout_ms / 1000)
        s.sendall(struct.pack("!i", self.me))
        self._socks[j] = s
    listener.settimeout(timeout_ms / 1000)
    while len(self._socks) < self.n - 1:
      s, _ = listener.accept()
      s.settimeout(timeout_ms / 1000)
      (j,) = struct.unpack("!i", _recv_exact(s, 4))
      self._socks[j] = s
    listener.close()
    for s in self._socks.values():
      s.setblocking(False)
      s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _give_watchdog_time_before_abort()
    self._thread = threading.Thread(target=self._run, daemon=True, name="peer-watchdog")
    self._thread.start()
    logging.info("Peer watchdog: %d peer(s), a silent one is given up after %.0f s.",
                 self.n - 1, self.timeout_s)

  # -- the loop -------------------------------------------------------------
  def _run(self) -> None:
    sel = selectors.DefaultSelector()
    for j, s in self._socks.items():
      sel.register(s, selectors.EVENT_READ, j)
    last_seen = {j: time.monotonic() for j in self._socks}
    next_beat = 0.0
    while not self._stop.is_set():
      now = time.monotonic()
      if now >= next_beat:
        with self._lock:
          for j, s in list(self._socks.items()):
            try:
              s.send(_HEARTBEAT)
            except BlockingIOError:
              pass  # Its buffer is full of our heartbeats: it is not reading, the timeout decides.
            except OSError:
              pass  # Seen as EOF / error on the read side.
        next_beat = now + self.interval
      for key, _ in sel.select(timeout=self.interval):
        j = key.data
        try:
          data = key.fileobj.recv(4096)
        except BlockingIOError:
          continue
        except OSError as e:
          self._lost(j, f"dropped its connection ({e.strerror or e})")
          return
        if not data:
          self._lost(j, "exited (its connection closed)")
          return
        if _BYE in data or _ERROR in data:
          sel.unregister(key.fileobj)
          last_seen.pop(j, None)
          if _ERROR in data:
            self._lost(j, "stopped with an error (see its own log)")
            return
          continue
        last_seen[j] = time.monotonic()
      now = time.monotonic()
      for j, seen in last_seen.items():
        if now - seen > self.timeout_s:
          self._lost(j, f"sent nothing for {now - seen:.0f} s (hung, or its host is gone)")
          return

  def _lost(self, j: int, how: str) -> None:
    if self._stop.is_set():
      return
    role = " (the coordinator)" if j == 0 else ""
    line = (f"process {j}{role} of {self.n} on {self._hosts.get(j, '?')} {how}; "
            f"process {self.me} stops (exit code {EXIT_PEER_LOST}).")
    try:  # One line on stderr, not also the absl log (which prints there too).
      sys.stderr.write(f"error: {line}\n")
      sys.stderr.flush()
    finally:
      self.verdict.set()
      self.exit_fn(EXIT_PEER_LOST)

  def stop(self, *, error: bool = False) -> None:
    """Says goodbye (or "stopping on an error") to every peer and stops watching."""
    self._stop.set()
    with self._lock:
      for s in self._socks.values():
        try:
          s.setblocking(True)
          s.sendall(_ERROR if error else _BYE)
        except OSError:
          pass
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=2 * self.interval + 1)
    for s in self._socks.values():
      s.close()
    self._socks.clear()


def _recv_exact(s: socket.socket, n: int) -> bytes:
  buf = b""
  while len(buf) < n:
    chunk = s.recv(n - len(buf))
    if not chunk:
      raise ConnectionError("peer closed during the watchdog handshake")
    buf += chunk
  return buf


def _give_watchdog_time_before_abort() -> None:
  """When JAX's client sees the coordinator vanish it aborts the process from a
  C++ thread at once. A C-level SIGABRT handler that sleeps a few seconds
  (``sleep`` is async-signal-safe; called with the signal number, it sleeps
  6 s) lets the watchdog, which sees the same closed connection, write its
  line and exit first; if it does not, the abort proceeds as before.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    handler = ctypes.cast(libc.sleep, ctypes.c_void_p).value
    libc.signal(signal.SIGABRT, handler)
  except (OSError, AttributeError):
    pass  # Not glibc/POSIX: the abort stays as JAX makes it.
