"""cmim_jax/native.py's cache folders: one root (``CMIM_JAX_CACHE``) moves
the FFI kernel's, the JPEG shim's and the compilation cache's folders, and
the two older per-folder variables still move their own folder (with a
DeprecationWarning). Paths only: nothing is compiled."""
import os

import pytest

from cmim_jax import native, xla_tuning
from cmim_jax.data import jpeg_crop
from cmim_jax.export import ffi

OLD = ('CMIM_JAX_FFI_CACHE', 'CMIM_CACHE_DIR')


@pytest.fixture
def env(monkeypatch):
  for name in OLD + ('CMIM_JAX_CACHE', 'XDG_CACHE_HOME'):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def _dirs():
  return (os.path.dirname(ffi.library_path()),
          os.path.dirname(jpeg_crop.library_path()))


def test_default_root(env):
  home = os.path.expanduser('~')
  assert _dirs() == (f'{home}/.cache/cmim_jax/ffi',
                     f'{home}/.cache/cmim_jax/jpeg_crop')
  env.setenv('XDG_CACHE_HOME', '/xdg')
  assert _dirs() == ('/xdg/cmim_jax/ffi', '/xdg/cmim_jax/jpeg_crop')


def test_one_root_moves_every_cache(env, tmp_path):
  env.setenv('XDG_CACHE_HOME', '/xdg')  # CMIM_JAX_CACHE wins over it.
  env.setenv('CMIM_JAX_CACHE', str(tmp_path))
  assert _dirs() == (str(tmp_path / 'ffi'), str(tmp_path / 'jpeg_crop'))
  assert xla_tuning.compilation_cache_dir(
      {'CMIM_JAX_CACHE': str(tmp_path)}) == str(tmp_path / 'jax_cache')
  env.setenv('CMIM_JAX_CACHE', '~/elsewhere')
  assert native.user_cache_dir('ffi') == os.path.expanduser('~/elsewhere/ffi')


@pytest.mark.parametrize('old', OLD)
def test_deprecated_names_move_only_their_own_folder(env, tmp_path, old):
  env.setenv('CMIM_JAX_CACHE', str(tmp_path / 'root'))
  env.setenv(old, str(tmp_path / 'old'))
  with pytest.warns(DeprecationWarning, match=f'{old}.*CMIM_JAX_CACHE'):
    dirs = _dirs()
  moved = OLD.index(old)
  assert dirs[moved] == str(tmp_path / 'old')
  assert dirs[1 - moved] == str(tmp_path / 'root' / ('ffi', 'jpeg_crop')[1 - moved])
