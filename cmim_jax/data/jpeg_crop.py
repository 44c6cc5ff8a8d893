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

import numpy as np

from cmim_jax import native

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       'jpeg_crop.c')
_ERR_LEN = 200
_state: dict = {}


class Fallback(Exception):
  """The shim declined this file (corrupt, truncated, CMYK, unexpected size):
  decode it with Pillow, which decides what it is."""


def _cache_dir() -> str:
  return os.environ.get('CMIM_CACHE_DIR') or native.user_cache_dir()


def _build(path: str):
  """Compiles the shim to ``path`` (once, atomically: :func:`native.build_once`)."""
  cc = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
  if not cc:
    raise OSError('no C compiler (cc/gcc) on PATH')
  native.build_once(
      path, lambda out: [cc, '-O2', '-shared', '-fPIC', '-o', out, _SOURCE, '-ljpeg'],
      timeout=120, error=OSError)


def _load():
  """The shim's function, building it if needed; raises OSError if not."""
  if os.environ.get('CMIM_JPEG_CROP', '1') == '0':
    raise OSError('disabled by CMIM_JPEG_CROP=0')
  with open(_SOURCE, 'rb') as fh:
    digest = hashlib.sha256(fh.read()).hexdigest()[:16]
  path = os.path.join(_cache_dir(), f'jpeg_crop-{digest}.so')
  if not os.path.exists(path):
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
