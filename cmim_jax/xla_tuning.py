"""Start-up and speed settings of JAX: XLA flags and the compilation cache.

XLA flags that make training faster on some platforms are set before JAX
starts (:func:`apply`); the persistent compilation cache
(:func:`enable_compilation_cache`) saves the compile time of later runs.

XLA:CPU in jaxlib 0.10 runs convolution weight gradients through YNNPACK,
2-4x slower than Eigen for these networks (``bench/README.md`` has the
profile). Only the CPU backend reads the flag; other jaxlib versions may not
know it, so it is added only where it was measured. ``CMIM_JAX_NO_XLA_TUNING=1``
turns this off.
"""

import importlib.metadata
import os

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_MEASURED_JAXLIB = ("0.10.",)


def extra_flags(current: str = "") -> list[str]:
  """The flags to add to an XLA_FLAGS string ``current``."""
  if os.environ.get("CMIM_JAX_NO_XLA_TUNING"):
    return []
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return []
  if version.startswith(_MEASURED_JAXLIB) and "ynn_fusion_type" not in current:
    return [CPU_CONV_FLAG]
  return []


def apply() -> None:
  """Adds :func:`extra_flags` to ``os.environ['XLA_FLAGS']``; call before JAX starts."""
  current = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([current, *extra_flags(current)]).strip()


# ------------------------------------------------------------ compilation cache

CACHE_ENV = "CMIM_JAX_COMPILATION_CACHE"
# Unbounded by default in JAX; in a user's home a cap (least recently used
# entries go first) keeps old jaxlib versions' entries from piling up.
CACHE_MAX_BYTES = 2 * 2**30


def compilation_cache_dir(environ=None):
  """Where compiled executables are cached, or ``None`` when caching is off.

  ``CMIM_JAX_COMPILATION_CACHE=0`` turns the cache off, any other value is the
  directory; unset, it is ``$XDG_CACHE_HOME/cmim_jax/jax_cache`` (by default
  ``~/.cache/cmim_jax/jax_cache``).
  """
  environ = os.environ if environ is None else environ
  value = environ.get(CACHE_ENV, "").strip()
  if value == "0":
    return None
  if value:
    return os.path.abspath(os.path.expanduser(value))
  from cmim_jax import native  # pylint: disable=g-import-not-at-top
  return native.user_cache_dir("jax_cache", environ=environ)


def enable_compilation_cache():
  """Turns on JAX's persistent compilation cache at :func:`compilation_cache_dir`.

  A second run of the same configuration then loads the train and eval steps
  (and the initialiser) from disk instead of compiling them again; the
  executables are the same, so results do not change. JAX keys each entry by
  the program, jax/jaxlib versions, backend and XLA flags. A cache directory
  already given to JAX (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
  Call after importing JAX, before the first compilation.

  Returns:
    The directory in use, or ``None`` (turned off, or not writable: then a
    warning says so and training goes on without the cache).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = compilation_cache_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    logging.warning("Compilation cache off: cannot create %s (%s); set %s to a writable "
                    "directory or to 0.", path, e, CACHE_ENV)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if jax.config.jax_compilation_cache_max_size == -1:
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  logging.info("JAX compilation cache: %s (%s=0 turns it off).", path, CACHE_ENV)
  return path
