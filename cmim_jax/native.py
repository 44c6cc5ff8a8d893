"""Native code compiled on first use: the per-user cache folder and the build.

The packed-conv XLA FFI kernel (``export/ffi.py``) and the partial JPEG
decoder (``data/jpeg_crop.py``) are compiled on the user's machine the first
time they are needed, each into its own sub folder (``ffi``, ``jpeg_crop``)
of one cache root, under a name keyed by what was compiled; JAX's compilation
cache (``xla_tuning.py``) is the ``jax_cache`` sub folder. The root is
``$CMIM_JAX_CACHE``, else ``$XDG_CACHE_HOME/cmim_jax``, else
``~/.cache/cmim_jax``. Several processes may start at once (xdist workers,
data-loader workers, hosts), so a build holds a file lock and appears
atomically: a reader sees no file or a whole one.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import warnings
from typing import Callable, Mapping, Sequence


ENV = "CMIM_JAX_CACHE"
# Deprecated: each names one sub folder itself (they predate CMIM_JAX_CACHE).
# Still honoured, ahead of CMIM_JAX_CACHE as the more specific setting, so
# that set-ups using them keep their caches.
DEPRECATED_ENV = {"ffi": "CMIM_JAX_FFI_CACHE", "jpeg_crop": "CMIM_CACHE_DIR"}


def user_cache_dir(sub: str, *, environ: Mapping[str, str] | None = None) -> str:
  """The cache folder for one kind of build: ``ROOT/SUB``.

  ``ROOT`` is ``$CMIM_JAX_CACHE``, else ``$XDG_CACHE_HOME/cmim_jax``, else
  ``~/.cache/cmim_jax``.

  Deprecated aliases, each replacing its own sub folder (not the root), kept
  so that existing set-ups do not break: ``$CMIM_JAX_FFI_CACHE`` is the
  ``ffi`` folder, ``$CMIM_CACHE_DIR`` the ``jpeg_crop`` folder. Set
  ``CMIM_JAX_CACHE`` instead.

  Args:
    sub: the sub folder (``ffi``, ``jpeg_crop``, ``jax_cache``).
    environ: the environment to read (default ``os.environ``).
  """
  environ = os.environ if environ is None else environ
  old = DEPRECATED_ENV.get(sub)
  if old and environ.get(old):
    warnings.warn(f"${old} is deprecated: set ${ENV} (the folder holding "
                  f"'{sub}' and the other caches) instead.", DeprecationWarning,
                  stacklevel=2)
    return os.path.expanduser(environ[old])
  root = environ.get(ENV) or os.path.join(
      environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "cmim_jax")
  return os.path.join(os.path.expanduser(root), sub)


def build_once(path: str, command: Callable[[str], Sequence[str]], *, timeout: float = 600,
               error: type[Exception] = RuntimeError) -> str:
  """Runs ``command(out)`` to compile into ``path`` unless it exists; returns ``path``.

  Args:
    path: the shared object to make; its name should key everything that
      changes the build (source hash, flags, versions).
    command: ``out -> argv`` of a compiler writing ``out``; called only
      when a build is needed, so that a cached build loads on a machine
      without a compiler: look the compiler up inside it.
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
