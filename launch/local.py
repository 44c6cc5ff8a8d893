r"""Starts N JAX processes on this machine: the multi-host path, testable on CPU.

  python launch/local.py --num_processes 2 --devices_per_process 4 -- \
      --config configs/digits.py:smoke --workdir /tmp/mh

Every process runs ``python -m cmim_jax.main`` with the arguments after ``--``
plus ``--coordinator_address localhost:PORT --num_processes N --process_id i
--num_cpu_devices D``; CPU collectives go through gloo. Output lines are
prefixed with the process id; the exit code is the first non-zero one.
SIGTERM to the launcher is passed on to every process (each saves a
checkpoint at the same step and exits 0), as a scheduler would send it.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _pump(stream, prefix, out):
  for line in iter(stream.readline, ""):
    out.write(f"[{prefix}] {line}")
    out.flush()


def launch(main_args, *, num_processes: int, devices_per_process: int,
           python: str = sys.executable, port: int | None = None,
           timeout: float | None = None) -> int:
  """Runs the processes to completion; returns the first non-zero exit code (or 0)."""
  port = port or free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # --num_cpu_devices sets the device count instead.
  procs, pumps = [], []
  for i in range(num_processes):
    cmd = [python, "-m", "cmim_jax.main", *main_args,
           f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
           f"--process_id={i}", f"--num_cpu_devices={devices_per_process}"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    t = threading.Thread(target=_pump, args=(p.stdout, f"p{i}", sys.stdout), daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)
  codes = []
  forwarded = {}
  if threading.current_thread() is threading.main_thread():
    def forward(signum, frame):
      del frame
      for p in procs:
        if p.poll() is None:
          p.send_signal(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
      forwarded[sig] = signal.signal(sig, forward)
  try:
    for p in procs:
      codes.append(p.wait(timeout=timeout))
  finally:
    for sig, previous in forwarded.items():
      signal.signal(sig, previous)
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in pumps:
      t.join(timeout=5)
  return next((c for c in codes if c), 0)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("main_args", nargs=argparse.REMAINDER,
                      help="arguments for cmim_jax.main, after --")
  args = parser.parse_args()
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  sys.exit(launch(main_args, num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process, port=args.port))


if __name__ == "__main__":
  main()
