"""Partial JPEG decoding (only the crop window's rows and columns) through a
small C shim over the system's libjpeg-turbo, built on first use.

``jpeg_crop.c`` is compiled with the system C compiler against the system
libjpeg-turbo (Debian/Ubuntu: ``libjpeg-dev``, which ``libjpeg62-turbo-dev``
provides) into a per-user cache folder keyed by the source's hash, under a
file lock and by atomic rename, so that concurrent workers build it once.
Where it cannot be built (no compiler, no headers, a libjpeg without
``jpeg_skip_scanlines``) or ``CMIM_JPEG_CROP=0`` is set, ``available()`` is
False with the reason in ``unavailable_reason()``, and ``data/decode.py``
decodes with Pillow as before: a fresh machine works without any flag, only
slower.

Cache folder: ``$CMIM_CACHE_DIR`` or ``$XDG_CACHE_HOME/cmim_jax`` or
``~/.cache/cmim_jax``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'jpeg_crop.c')
_ERR_LEN = 200
_state: dict = {}


class Fallback(Exception):
  """The shim declined this file (corrupt, truncated, CMYK, unexpected size):
  decode it with Pillow, which decides what it is."""


def _cache_dir() -> str:
  base = os.environ.get('CMIM_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
      'cmim_jax')
  return base


def _build(path: str):
  """Compiles the shim to ``path`` (atomic: a temporary file, renamed)."""
  cc = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
  if not cc:
    raise OSError('no C compiler (cc/gcc) on PATH')
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [cc, '-O2', '-shared', '-fPIC', '-o', tmp, _SOURCE, '-ljpeg']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          check=False)
    if proc.returncode:
      raise OSError(f'{" ".join(cmd)} failed: {proc.stderr.strip()[-500:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load():
  """The shim's function, building it if needed; raises OSError if not."""
  if os.environ.get('CMIM_JPEG_CROP', '1') == '0':
    raise OSError('disabled by CMIM_JPEG_CROP=0')
  with open(_SOURCE, 'rb') as fh:
    digest = hashlib.sha256(fh.read()).hexdigest()[:16]
  folder = _cache_dir()
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f'jpeg_crop-{digest}.so')
  if not os.path.exists(path):
    import filelock  # pylint: disable=g-import-not-at-top
    with filelock.FileLock(path + '.lock', timeout=300):
      if not os.path.exists(path):  # Another process may have built it.
        _build(path)
  lib = ctypes.CDLL(path)
  fn = lib.cmim_jpeg_crop
  fn.restype = ctypes.c_int
  fn.argtypes = ([ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 8 +
                 [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                  ctypes.c_char_p, ctypes.c_int])
  return fn


def _function():
  if 'fn' not in _state:
    try:
      _state['fn'], _state['reason'] = _load(), ''
    except (OSError, subprocess.SubprocessError) as e:
      _state['fn'], _state['reason'] = None, str(e)
  return _state['fn']


def available() -> bool:
  """Whether the shim is built (or could be built now) and loads."""
  return _function() is not None


def unavailable_reason() -> str:
  """Why ``available()`` is False ('' when it is True)."""
  _function()
  return _state['reason']


def decode_window(data: bytes, *, denom: int, scaled_size, channels: int,
                  window):
  """Decodes ``window`` of a JPEG at scale ``1/denom`` into a canvas of the
  whole scaled image.

  Args:
    data: the JPEG file's bytes.
    denom: 1, 2, 4 or 8 (libjpeg's DCT scaling).
    scaled_size: ``(width, height)`` the scaled image has (checked).
    channels: 4 (a colour file, decoded to RGBX: Pillow's own layout, so
      that it maps the canvas without a copy) or 1 (a grayscale file).
    window: ``(x, y, w, h)`` in scaled pixels, inside the image.

  Returns:
    ``(canvas, x0, cw)``: uint8[height, width, channels] (``[height,
    width]`` for 1 channel) holding the image's rows ``y .. y + h - 1``,
    columns ``x0 .. x0 + cw - 1`` (libjpeg widens the window to its block
    columns: ``x0 <= x``, ``x0 + cw >= x + w``); the rest is uninitialised.

  Raises:
    Fallback: the shim declined the file (see ``Fallback``).
  """
  fn = _function()
  if fn is None:
    raise Fallback(_state['reason'])
  if not data.endswith(b'\xff\xd9'):
    # A truncated file: the window may lie in the part that is there, but
    # Pillow refuses the file, so the run does too (or skips it).
    raise Fallback('no end-of-image marker (truncated file?)')
  x, y, w, h = window
  width, height = scaled_size
  # np.empty: the pages outside the window are never written or read.
  canvas = np.empty((height, width, channels) if channels > 1 else
                    (height, width), np.uint8)
  info = np.zeros(2, np.int32)
  err = ctypes.create_string_buffer(_ERR_LEN)
  status = fn(data, len(data), denom, width, height, channels, x, y, w, h,
              canvas.ctypes.data, canvas.strides[0], info.ctypes.data, err,
              _ERR_LEN)
  if status:
    raise Fallback(err.value.decode(errors='replace') or f'status {status}')
  return canvas, int(info[0]), int(info[1])
