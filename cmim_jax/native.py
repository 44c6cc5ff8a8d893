"""Native code compiled on first use: the per-user cache folder and the build.

The packed-conv XLA FFI kernel (``export/ffi.py``) and the partial JPEG
decoder (``data/jpeg_crop.py``) are compiled on the user's machine the first
time they are needed, into ``$XDG_CACHE_HOME/cmim_jax`` (default
``~/.cache/cmim_jax``), under a name keyed by what was compiled. Several
processes may start at once (xdist workers, data-loader workers, hosts), so a
build holds a file lock and appears atomically: a reader sees no file or a
whole one.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Callable, Mapping, Sequence


def user_cache_dir(*parts: str, environ: Mapping[str, str] | None = None) -> str:
  """``$XDG_CACHE_HOME/cmim_jax/PARTS`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "cmim_jax", *parts)


def build_once(path: str, command: Callable[[str], Sequence[str]], *, timeout: float = 600,
               error: type[Exception] = RuntimeError) -> str:
  """Runs ``command(out)`` to compile into ``path`` unless it exists; returns ``path``.

  Args:
    path: the shared object to make; its name should key everything that
      changes the build (source hash, flags, versions).
    command: ``out -> argv`` of a compiler writing ``out``.
    timeout: seconds for the compiler.
    error: raised, with the compiler's stderr, when it fails.
  """
  if os.path.exists(path):
    return path
  import filelock  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with filelock.FileLock(path + ".lock", timeout=timeout):
    if os.path.exists(path):  # Another process built it while we waited.
      return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
      argv = list(command(tmp))
      r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
      if r.returncode != 0:
        raise error(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
      os.replace(tmp, path)  # Atomic: readers see no file or a whole one.
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return path
