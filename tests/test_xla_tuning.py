"""cmim_jax.xla_tuning: where the compilation cache goes, and that it is used."""
import json
import os
import subprocess
import sys

import pytest

from cmim_jax import xla_tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tests_do_not_write_into_the_users_cache():
  # conftest.py turns the cache off for every test and subprocess.
  assert os.environ[xla_tuning.CACHE_ENV] == "0"
  assert xla_tuning.compilation_cache_dir() is None
  # The session's shared cache (conftest.py), when on, is a temporary directory.
  session = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if session is not None:
    import tempfile  # pylint: disable=g-import-not-at-top
    assert os.path.commonpath([session, tempfile.gettempdir()]) == tempfile.gettempdir()


@pytest.mark.parametrize("environ, want", [
    ({}, "/home/u/.cache/cmim_jax/jax_cache"),
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/cmim_jax/jax_cache"),
    ({"CMIM_JAX_COMPILATION_CACHE": "/tmp/c"}, "/tmp/c"),
    ({"CMIM_JAX_COMPILATION_CACHE": "0", "XDG_CACHE_HOME": "/xdg"}, None),
])
def test_cache_dir(monkeypatch, environ, want):
  monkeypatch.setenv("HOME", "/home/u")
  assert xla_tuning.compilation_cache_dir(environ) == want


_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from cmim_jax import xla_tuning
path = xla_tuning.enable_compilation_cache()
x = jnp.arange(64.0).reshape(8, 8)
y = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0))(x)
print(json.dumps({"path": path, "y": [float(v) for v in y]}))
"""


def _run(cache):
  env = dict(os.environ, CMIM_JAX_COMPILATION_CACHE=cache, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  # Without the test session's shared cache (conftest.py): what a user's run sees.
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"):
    env.pop(name, None)
  out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True,
                       text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_is_written_then_read_with_the_same_results(tmp_path):
  cache = tmp_path / "jax_cache"
  first = _run(str(cache))
  assert first["path"] == str(cache)
  entries = sorted(os.listdir(cache))
  assert entries, "the first run wrote no cache entry"
  mtimes = {e: os.stat(cache / e).st_mtime_ns for e in entries}
  second = _run(str(cache))
  assert second["y"] == first["y"]
  # The second run found its executables: nothing new, no executable
  # rewritten, and the size-capped cache recorded the reads (its -atime files).
  assert sorted(os.listdir(cache)) == entries
  executables = [e for e in entries if e.endswith("-cache")]
  reads = [e for e in entries if e.endswith("-atime")]
  assert any(e.startswith("jit__lambda") for e in executables), entries
  assert all(os.stat(cache / e).st_mtime_ns == mtimes[e] for e in executables)
  assert reads and all(os.stat(cache / e).st_mtime_ns > mtimes[e] for e in reads)


def test_cache_off(tmp_path):
  assert _run("0")["path"] is None
