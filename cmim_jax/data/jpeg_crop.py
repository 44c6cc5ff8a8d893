"""Partial JPEG decoding (only the crop window's rows and columns) through a
small C shim over the system's libjpeg-turbo, built on first use, and the
crop's resize to the output in the same call.

``jpeg_crop.c`` (the decoding) and ``resample.c`` (a resize with the
arithmetic of Pillow's antialiased bilinear filter, bit-equal to
``Image.resize(size, BILINEAR, box=...)``, with SSE4.1/AVX2 kernels chosen
at run time) are compiled with the system C compiler against the system
libjpeg-turbo (Debian/Ubuntu: ``libjpeg-dev``, which ``libjpeg62-turbo-dev``
provides) into a per-user cache folder keyed by the sources' hash, under a
file lock and by atomic rename, so that concurrent workers build it once.
Where it cannot be built (no compiler, no headers, a libjpeg without
``jpeg_skip_scanlines``) or ``CMIM_JPEG_CROP=0`` is set, ``available()`` is
False with the reason in ``unavailable_reason()``, and ``data/decode.py``
decodes with Pillow as before: a fresh machine works without any flag, only
slower.

The resize follows the installed Pillow's arithmetic (13.0: weights in
double, 22-bit fixed point, uint8 between the passes, the vertical pass
first when it removes more than twice as many rows as the horizontal one
removes columns). ``resize_matches_pillow()`` checks that on a few boxes
once a process; if another Pillow rounds differently, ``decode.py`` lets
Pillow resize the decoded window (``CMIM_JPEG_RESIZE=0`` does so too).
``CMIM_RESAMPLE_SIMD=0/1/2`` caps the kernels (scalar, SSE4.1, AVX2).

Cache folder (:func:`library_path`): ``jpeg_crop`` under ``$CMIM_JAX_CACHE``
or ``$XDG_CACHE_HOME/cmim_jax`` or ``~/.cache/cmim_jax``
(:func:`cmim_jax.native.user_cache_dir`); ``$CMIM_CACHE_DIR``, deprecated,
still replaces that folder.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess

import numpy as np

from cmim_jax import native

_HERE = os.path.dirname(os.path.abspath(__file__))
_C_SOURCES = tuple(os.path.join(_HERE, f) for f in ('jpeg_crop.c', 'resample.c'))
_SOURCES = _C_SOURCES + (os.path.join(_HERE, 'resample.h'),)  # all keyed into the build
_ERR_LEN = 200
_state: dict = {}


class Fallback(Exception):
  """The shim declined this file (corrupt, truncated, CMYK, unexpected size):
  decode it with Pillow, which decides what it is."""


def library_path() -> str:
  """Where the shim built from the current sources is cached (it may not
  exist yet): ``native.user_cache_dir('jpeg_crop')``, named by the sources'
  hash."""
  sha = hashlib.sha256()
  for source in _SOURCES:
    with open(source, 'rb') as fh:
      sha.update(fh.read())
  return os.path.join(native.user_cache_dir('jpeg_crop'),
                      f'jpeg_crop-{sha.hexdigest()[:16]}.so')


def _build(path: str) -> str:
  """Compiles the shim to ``path`` unless it is there (:func:`native.build_once`
  checks); returns ``path``."""
  def command(out):
    # Looked up only when a build is needed: a cached shim loads on a machine
    # without a compiler.
    cc = os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
    if not cc:
      raise OSError('no C compiler (cc/gcc) on PATH')
    # -ffp-contract=off: no fused multiply-adds in the filter weights' double
    # arithmetic (Pillow's are computed without), so they round alike.
    return [cc, '-O2', '-ffp-contract=off', '-shared', '-fPIC', '-o', out,
            *_C_SOURCES, '-ljpeg']
  # native.build_once's default timeout (600 s), as for the C++ kernel: on a
  # heavily loaded machine a compile of a few seconds can take much longer.
  return native.build_once(path, command, error=OSError)


def _load():
  """The shim's library, building it if needed; raises OSError if not."""
  if os.environ.get('CMIM_JPEG_CROP', '1') == '0':
    raise OSError('disabled by CMIM_JPEG_CROP=0')
  path = _build(library_path())
  lib = ctypes.CDLL(path)
  c_int, c_ptr, c_long = ctypes.c_int, ctypes.c_void_p, ctypes.c_long
  lib.cmim_jpeg_crop.restype = c_int
  lib.cmim_jpeg_crop.argtypes = (
      [ctypes.c_char_p, ctypes.c_ulong] + [c_int] * 8 +
      [c_ptr, c_long, c_ptr, ctypes.c_char_p, c_int])
  lib.cmim_jpeg_crop_region.restype = c_int
  lib.cmim_jpeg_crop_region.argtypes = (
      [ctypes.c_char_p, ctypes.c_ulong] + [c_int] * 8 +
      [c_ptr, ctypes.c_ulong, c_ptr, ctypes.c_char_p, c_int])
  lib.cmim_jpeg_crop_resize.restype = c_int
  lib.cmim_jpeg_crop_resize.argtypes = (
      [ctypes.c_char_p, ctypes.c_ulong] + [c_int] * 8 +
      [c_ptr, c_int, c_int, c_int, c_ptr, c_long, c_int, ctypes.c_char_p,
       c_int])
  lib.cmim_resample.restype = c_int
  lib.cmim_resample.argtypes = ([c_ptr, c_long] + [c_int] * 7 +
                                [c_ptr, c_int, c_int, c_int, c_ptr, c_long,
                                 c_int])
  lib.cmim_resample_simd_level.restype = c_int
  return lib


def _library():
  """The loaded shim (once a process), or None with the reason kept."""
  if 'lib' not in _state:
    try:
      _state['lib'], _state['reason'] = _load(), ''
    except (OSError, subprocess.SubprocessError) as e:
      _state['lib'], _state['reason'] = None, str(e)
  return _state['lib']


def _lib():
  lib = _library()
  if lib is None:
    raise Fallback(_state['reason'])
  return lib


def available() -> bool:
  """Whether the shim is built (or could be built now) and loads."""
  return _library() is not None


def unavailable_reason() -> str:
  """Why ``available()`` is False ('' when it is True)."""
  _library()
  return _state['reason']


def _decode(fn, data: bytes, *args):
  """``fn(data, len(data), *args, err, err_len)``, a shim entry point that
  decodes ``data``; raises Fallback with the shim's message if it declines."""
  if not data.endswith(b'\xff\xd9'):
    # A truncated file: the window may lie in the part that is there, but
    # Pillow refuses the file, so the run does too (or skips it).
    raise Fallback('no end-of-image marker (truncated file?)')
  err = ctypes.create_string_buffer(_ERR_LEN)
  status = fn(data, len(data), *args, err, _ERR_LEN)
  if status:
    raise Fallback(err.value.decode(errors='replace') or f'status {status}')


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
  lib = _lib()
  x, y, w, h = window
  width, height = scaled_size
  # np.empty: the pages outside the window are never written or read.
  canvas = np.empty((height, width, channels) if channels > 1 else
                    (height, width), np.uint8)
  info = np.zeros(2, np.int32)
  _decode(lib.cmim_jpeg_crop, data, denom, width, height, channels, x, y, w,
          h, canvas.ctypes.data, canvas.strides[0], info.ctypes.data)
  return canvas, int(info[0]), int(info[1])


# libjpeg widens a window leftwards to its iMCU column: by less than
# max_h_samp_factor (<= 4) DCT blocks (<= 8 pixels).
_MAX_WIDENING = 31


def decode_region(data: bytes, *, denom: int, scaled_size, channels: int,
                  window):
  """:func:`decode_window`'s pixels without the canvas: only the decoded
  columns, packed, as :func:`decode_resize` holds them before it resizes.

  Args: as :func:`decode_window`.

  Returns:
    ``(region, x0)``: uint8[h, cw, channels] (``[h, cw]`` for 1 channel),
    the image's rows ``y .. y + h - 1`` and columns ``x0 .. x0 + cw - 1``
    (``x0 <= x``, ``x0 + cw >= x + w``, as :func:`decode_window`'s).

  Raises:
    Fallback: the shim declined the file (see ``Fallback``).
  """
  lib = _lib()
  x, y, w, h = window
  width, height = scaled_size
  buf = np.empty(max(h, 0) * (max(w, 0) + _MAX_WIDENING) * channels, np.uint8)
  info = np.zeros(2, np.int32)
  _decode(lib.cmim_jpeg_crop_region, data, denom, width, height, channels, x,
          y, w, h, buf.ctypes.data, buf.size, info.ctypes.data)
  x0, cw = int(info[0]), int(info[1])
  region = buf[:h * cw * channels]
  return region.reshape((h, cw, channels) if channels > 1 else (h, cw)), x0


def _simd(simd) -> int:
  # CMIM_RESAMPLE_SIMD=0/1/2 caps the kernels (scalar/SSE4.1/AVX2), e.g. to
  # compare them; unset: the best the CPU runs.
  if simd is None:
    return int(os.environ.get('CMIM_RESAMPLE_SIMD', '-1'))
  return simd


def simd_level() -> int:
  """The resize kernels this CPU runs: 0 scalar, 1 SSE4.1, 2 AVX2."""
  return int(_lib().cmim_resample_simd_level())


def _output(out, size):
  if out is None:
    return np.empty((size, size, 3), np.uint8)
  if (out.shape != (size, size, 3) or out.dtype != np.uint8 or
      out.strides[1:] != (3, 1)):
    raise ValueError(f'out must be uint8[{size}, {size}, 3] with contiguous '
                     f'rows, got {out.dtype}{list(out.shape)} strides '
                     f'{out.strides}; pass a row of the batch array.')
  return out


def resize(src, box, size: int, *, flip=False, origin=(0, 0),
           image_size=None, simd=None, out=None):
  """``PIL.Image.resize((size, size), BILINEAR, box=box)`` of an image, bit
  for bit, as RGB (grayscale replicated), mirrored left-right if ``flip``.

  Args:
    src: uint8[h, w, 4] (RGBX) or uint8[h, w] (grayscale) rows ``origin[1]
      ..`` and columns ``origin[0] ..`` of the image, rows contiguous.
    box: ``(x0, y0, x1, y1)`` on the whole image.
    size: output side.
    flip: mirror the output.
    origin: ``(x, y)`` of ``src[0, 0]`` in the image.
    image_size: ``(width, height)`` of the whole image (the filter's
      geometry); default: ``src``'s.
    simd: -1 the best kernels, 0 scalar, 1 SSE4.1 at most, 2 AVX2 at most.
    out: uint8[size, size, 3] to write into (e.g. a row of a batch).

  Returns:
    ``out``, or a new uint8[size, size, 3].

  Raises:
    Fallback: the shim is unavailable, or the filter reads outside ``src``.
  """
  lib = _lib()
  src = np.asarray(src)
  channels = 1 if src.ndim == 2 else src.shape[2]
  if src.dtype != np.uint8 or channels not in (1, 4) or (
      src.strides[1:] != ((channels, 1) if channels > 1 else (1,))):
    raise ValueError(f'src must be uint8[h, w, 4] or uint8[h, w] with '
                     f'contiguous rows, got {src.dtype}{list(src.shape)}.')
  width, height = image_size or (src.shape[1], src.shape[0])
  out = _output(out, size)
  b = np.asarray(box, np.float32)  # Pillow's box is C floats too.
  status = lib.cmim_resample(
      src.ctypes.data, src.strides[0], channels, width, height, origin[0],
      origin[1], src.shape[1], src.shape[0], b.ctypes.data, size, size,
      int(flip), out.ctypes.data, out.strides[0], _simd(simd))
  if status:
    raise Fallback(f'resample status {status}')
  return out


def decode_resize(data: bytes, *, denom: int, scaled_size, channels: int,
                  window, box, size: int, flip: bool, out=None, simd=None):
  """:func:`decode_window`'s window, resized as :func:`resize` does, in one
  call: Pillow's ``resize((size, size), BILINEAR, box=box)`` of the full
  decode at scale ``1/denom``, bit for bit, holding only the window.

  Returns:
    ``out``, or a new uint8[size, size, 3].

  Raises:
    Fallback: the shim declined the file (see ``Fallback``), or the filter
      reads outside ``window``.
  """
  lib = _lib()
  x, y, w, h = window
  width, height = scaled_size
  out = _output(out, size)
  b = np.asarray(box, np.float32)
  _decode(lib.cmim_jpeg_crop_resize, data, denom, width, height, channels, x,
          y, w, h, b.ctypes.data, size, size, int(flip), out.ctypes.data,
          out.strides[0], _simd(simd))
  return out


def resize_enabled() -> bool:
  """Whether ``decode.py`` resizes in the shim (:func:`decode_resize`): the
  shim loads, its resize passes :func:`resize_matches_pillow`, and
  ``CMIM_JPEG_RESIZE=0`` is not set (then the shim decodes and Pillow
  resizes, the same pixels more slowly)."""
  return (os.environ.get('CMIM_JPEG_RESIZE', '1') != '0' and
          resize_matches_pillow())


def resize_matches_pillow() -> bool:
  """Whether :func:`resize` gives the installed Pillow's pixels on a few
  test boxes (both pass orders, up- and downscaling); checked once a
  process. False (another Pillow's arithmetic): ``decode.py`` resizes with
  Pillow, as without the shim."""
  if 'pillow_ok' not in _state:
    _state['pillow_ok'] = available() and _check_against_pillow()
  return _state['pillow_ok']


def _check_against_pillow() -> bool:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # A tall image (Pillow resizes vertically first) and a wide one
  # (horizontally first); down- and upscaling, fractional boxes.
  for height, width in ((61, 29), (29, 61)):
    image = rng.integers(0, 256, (height, width, 4), np.uint8)
    for box, size in (((3.3, 2.7, 25.9, 27.1), 17), ((1.5, 0.2, 20.6, 28.8), 9),
                      ((10.2, 4.4, 14.9, 8.1), 23), ((0, 0, 29, 29), 29)):
      for src, mode in ((image, 'RGBX'), (image[..., 0].copy(), 'L')):
        pil = Image.frombuffer(mode, (width, height), src, 'raw', mode, 0, 1)
        want = np.asarray(pil.resize((size, size), Image.BILINEAR,
                                     box=box).convert('RGB'))
        try:
          got = resize(src, box, size)
        except Fallback:
          return False
        if not np.array_equal(got, want):
          return False
  return True
