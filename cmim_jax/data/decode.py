"""Decode + crop of one streamed image: the random-resized crop or the
evaluation crop, at the smallest JPEG decode scale the crop allows.

Semantics: the crop window is ``augment.sample_resized_crop_box`` (the
in-memory path's random-resized crop, torchvision's
``RandomResizedCrop`` parameters) drawn on the image's full size, read from
the file's header before anything is decoded; then a flip (training), or
the central ``crop_fraction`` of the shorter side (evaluation). The window
is resized to ``size x size`` by Pillow's antialiased bilinear filter (the
filter of torchvision's PIL path), in one ``resize(box=...)`` call with no
intermediate crop copy.

One difference from torchvision: when the window is at least twice the
output size, a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
scaling, ``Image.draft``), the largest reduction that still leaves the
window at least ``size`` pixels a side, so the bilinear filter always
resizes down from at least the output size. The DCT-domain reduction is a
box-like average, so the result is close to, but not bit-equal with, the
full-size decode (``tests/test_data_decode.py`` bounds the difference).

Where the C shim of ``data/jpeg_crop.py`` builds (libjpeg-turbo and a C
compiler), a JPEG is decoded only where the filter reads: the rows above
the window are skipped without inverse DCT, the columns beside it are not
transformed, and decoding stops below it. The decoded pixels are those of
the full decode at the same scale (``tests/test_data_jpeg_crop.py``). The
same C call then resizes them with the arithmetic of Pillow's bilinear
filter (``data/resample.c``: SIMD, bit-equal to ``resize(box=...)`` on the
whole decoded image, ``tests/test_data_resample.py``), flips, and writes
the crop into the caller's batch row. Where that resize does not match the
installed Pillow (checked once a process) or ``CMIM_JPEG_RESIZE=0``, the
window is laid out on a canvas of the whole image and Pillow resizes it,
with the same output. Files the shim declines (CMYK, corrupt or truncated
data) go through Pillow as before.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
from PIL import Image

from cmim_jax.data import augment as _augment
from cmim_jax.data import jpeg_crop as _jpeg_crop

DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error,
                 Image.DecompressionBombError)

# Modes whose resize equals the resize of their RGB conversion (L: one
# channel replicated), so the (cheaper) resize can come before the convert.
_RESIZE_THEN_CONVERT = ('RGB', 'L')

# Bilinear filter support in input pixels per unit of downscaling (Pillow's).
_BILINEAR_SUPPORT = 1.0
# Columns/rows decoded beyond what the filter reads: libjpeg's upsampler has
# no neighbour at the decoded region's outer column (4:2:x chroma).
_MARGIN = 2


def shim_channels(mode: str) -> int:
  """The channels the JPEG shim decodes a file of Pillow ``mode`` (one of
  ``_RESIZE_THEN_CONVERT``) to: 4 for RGB (as RGBX, Pillow's own layout), 1
  for L."""
  return 4 if mode == 'RGB' else 1


class CorruptImageError(ValueError):
  """An image could not be decoded (the message names it and the fix)."""


def crop_window(rng, height: int, width: int, crop_fraction: float):
  """``(top, left, h, w, flip)`` of the crop on a ``height x width`` image.

  ``rng`` None: the evaluation crop (central ``crop_fraction`` of the
  shorter side, no flip); else the random-resized crop, then a flip.
  """
  if rng is None:
    side = int(round(min(height, width) * crop_fraction))
    return (height - side) // 2, (width - side) // 2, side, side, False
  top, left, h, w = _augment.sample_resized_crop_box(rng, height, width)
  return top, left, h, w, bool(rng.random() < 0.5)


def _draft_size(width, height, w, h, size):
  """The size ``Image.draft`` is asked for: the image scaled so that the
  ``w x h`` window becomes at least ``size x size``."""
  return math.ceil(width * size / w), math.ceil(height * size / h)


def _dct_denom(width, height, w, h, size) -> int:
  """The DCT scale denominator Pillow's ``draft`` picks for that size."""
  want_w, want_h = _draft_size(width, height, w, h, size)
  scale = min(width // want_w, height // want_h)
  return next((s for s in (8, 4, 2) if scale >= s), 1)


def scale_and_box(width, height, window, size, reduced=True):
  """``(denom, (sw, sh), box)``: the DCT scale ``1/denom`` a JPEG is decoded
  at, the scaled image's size (libjpeg rounds up) and the crop ``window``
  ``(top, left, h, w)`` of the full-size image as a box on the scaled one."""
  top, left, h, w = window
  denom = _dct_denom(width, height, w, h, size) if reduced else 1
  sw, sh = -(-width // denom), -(-height // denom)
  sx, sy = sw / width, sh / height
  return denom, (sw, sh), (left * sx, top * sy, (left + w) * sx,
                           (top + h) * sy)


def read_window(box, scaled_size, size):
  """``(x, y, w, h)``: the pixels the bilinear filter reads to resize
  ``box`` to ``size``, plus ``_MARGIN``, inside the scaled image."""
  lo, hi = [], []
  for axis in (0, 1):
    a, b = box[axis], box[axis + 2]
    support = _BILINEAR_SUPPORT * max((b - a) / size, 1.0)
    lo.append(max(0, math.floor(a - support) - _MARGIN))
    hi.append(min(scaled_size[axis], math.ceil(b + support) + _MARGIN))
  return lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]


def partial_decode(data, mode, denom, scaled_size, box, size):
  """Decodes only the rows and columns the filter reads for ``box`` (plus
  ``_MARGIN``), in place on a canvas of the whole scaled image: a Pillow
  image that ``resize(box=box)`` turns into the full decode's output.

  Raises:
    jpeg_crop.Fallback: the shim declined the file.
  """
  channels = shim_channels(mode)
  canvas, _, _ = _jpeg_crop.decode_window(
      data, denom=denom, scaled_size=scaled_size, channels=channels,
      window=read_window(box, scaled_size, size))
  # The same geometry as the full decode (Pillow's resampler rounds
  # differently on a smaller image), mapped without a copy.
  raw = 'RGBX' if channels == 4 else 'L'
  return Image.frombuffer(raw, scaled_size, canvas, 'raw', raw, 0, 1)


def _resize_flip(src, box, size, flip, out):
  image = src.resize((size, size), Image.BILINEAR, box=box)
  if image.mode not in ('RGB', 'RGBX'):
    image = image.convert('RGB')
  image = np.asarray(image)[..., :3]
  return _into(image[:, ::-1] if flip else image, out)


def _into(image, out):
  if out is None:
    return image
  out[...] = image
  return out


def decode_crop(data, where: str, *, size: int, rng=None,
                crop_fraction: float = 0.875, reduced: bool = True,
                partial=None, out=None):
  """Encoded image (or uint8 array) -> uint8[size, size, 3].

  Args:
    data: encoded bytes, or an already decoded uint8[H, W, C] array.
    where: the image's path, for errors.
    size: output side.
    rng: a numpy Generator for the training crop and flip; None for the
      evaluation crop (central ``crop_fraction`` of the shorter side).
    crop_fraction: evaluation crop fraction.
    reduced: decode JPEGs at a reduced scale when the crop allows it.
    partial: decode only the window of a JPEG (``data/jpeg_crop.py``); None:
      where the shim is available, False: never (Pillow decodes it all).
    out: a uint8[size, size, 3] array (a row of the caller's batch) to write
      the crop into.

  Returns:
    ``out`` holding the crop; without ``out``, the crop (it may be a flipped
    view, which the caller copies into its batch anyway).

  Raises:
    CorruptImageError: the image cannot be decoded (names ``where``).
  """
  try:
    if isinstance(data, np.ndarray):
      image = data if data.shape[-1] == 3 else np.repeat(data[..., :1], 3, -1)
      if rng is not None:
        return _into(_augment.random_resized_crop_flip_np(image, rng, size),
                     out)
      return _into(_augment.center_crop_resize_np(image, size, crop_fraction),
                   out)
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size  # From the header: nothing decoded yet.
      top, left, h, w, flip = crop_window(rng, height, width, crop_fraction)
      is_jpeg = im.format == 'JPEG'
      denom, scaled, box = scale_and_box(width, height, (top, left, h, w),
                                         size, reduced and is_jpeg)
      if (partial is not False and is_jpeg and
          im.mode in _RESIZE_THEN_CONVERT and _jpeg_crop.available()):
        try:
          if _jpeg_crop.resize_enabled():
            # Decode and resize in one C call, into `out`.
            return _jpeg_crop.decode_resize(
                bytes(data), denom=denom, scaled_size=scaled,
                channels=shim_channels(im.mode),
                window=read_window(box, scaled, size), box=box, size=size,
                flip=flip, out=out)
          src = partial_decode(bytes(data), im.mode, denom, scaled, box,
                               size)
          return _resize_flip(src, box, size, flip, out)
        except _jpeg_crop.Fallback:
          pass  # Pillow decodes it below and decides (corrupt, CMYK...).
      if denom > 1:
        # Pillow's draft() picks the same scale from this requested size.
        im.draft('RGB', _draft_size(width, height, w, h, size))
        if im.size != scaled:  # draft() declined (e.g. several tiles).
          box = scale_and_box(width, height, (top, left, h, w), size,
                              False)[2]
      im.load()  # Decodes: truncated files fail here.
      # convert() copies even an RGB image; resize in the file's own mode
      # where that gives the same pixels, and convert only the small output.
      src = im if im.mode in _RESIZE_THEN_CONVERT else im.convert('RGB')
      return _resize_flip(src, box, size, flip, out)
  except CorruptImageError:
    raise
  except DECODE_ERRORS as e:
    raise CorruptImageError(
        f'Cannot decode image {where}: {e}. Delete or replace the file, or '
        f"set data.on_corrupt='skip' to skip such images.") from None
