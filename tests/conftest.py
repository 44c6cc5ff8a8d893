"""Test set-up: 8 simulated CPU devices, set before JAX starts, and one
compilation cache for the whole test session."""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never write into the user's compilation cache (~/.cache/cmim_jax);
# tests of the cache give it a temporary directory.
os.environ["CMIM_JAX_COMPILATION_CACHE"] = "0"

# Many tests compile the same programs (the same small train step in several
# tests, a run and its resumed twin, a subprocess and the test that started
# it): JAX's persistent cache in a directory of this session's own turns the
# second compile into a read. The executables are the ones XLA compiled, so
# no number changes. The first process (pytest, or xdist's controller) makes
# the directory; xdist workers and the tests' subprocesses inherit the
# variables. A size cap makes JAX lock the directory (filelock) while it
# reads or writes, which is what makes one directory safe for the xdist
# workers to share. CMIM_JAX_TEST_COMPILATION_CACHE=0 turns this off.
_SESSION_CACHE = None
if (os.environ.get("CMIM_JAX_TEST_COMPILATION_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  _SESSION_CACHE = tempfile.mkdtemp(prefix="cmim_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 * 2**30))


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """Removes the session's compilation cache (in the process that made it)."""
  if _SESSION_CACHE is not None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
