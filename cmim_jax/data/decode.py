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
full-size decode (``tests/test_data_stream.py`` bounds the difference).
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
from PIL import Image

from cmim_jax.data import augment as _augment

DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error,
                 Image.DecompressionBombError)

# Modes whose resize equals the resize of their RGB conversion (L: one
# channel replicated), so the (cheaper) resize can come before the convert.
_RESIZE_THEN_CONVERT = ('RGB', 'L')


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


def decode_crop(data, where: str, *, size: int, rng=None,
                crop_fraction: float = 0.875, reduced: bool = True):
  """Encoded image (or uint8 array) -> uint8[size, size, 3].

  Args:
    data: encoded bytes, or an already decoded uint8[H, W, C] array.
    where: the image's path, for errors.
    size: output side.
    rng: a numpy Generator for the training crop and flip; None for the
      evaluation crop (central ``crop_fraction`` of the shorter side).
    crop_fraction: evaluation crop fraction.
    reduced: decode JPEGs at a reduced scale when the crop allows it.

  Returns:
    The crop; it may be a flipped view, which the caller copies into its
    batch anyway.

  Raises:
    CorruptImageError: the image cannot be decoded (names ``where``).
  """
  try:
    if isinstance(data, np.ndarray):
      image = data if data.shape[-1] == 3 else np.repeat(data[..., :1], 3, -1)
      if rng is not None:
        return _augment.random_resized_crop_flip_np(image, rng, size)
      return _augment.center_crop_resize_np(image, size, crop_fraction)
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size  # From the header: nothing decoded yet.
      top, left, h, w, flip = crop_window(rng, height, width, crop_fraction)
      if reduced and im.format == 'JPEG':
        # draft() picks the largest power-of-two reduction keeping the image
        # at least this big, i.e. the crop at least size x size.
        im.draft('RGB', (math.ceil(width * size / w),
                         math.ceil(height * size / h)))
      sx, sy = im.size[0] / width, im.size[1] / height
      im.load()  # Decodes: truncated files fail here.
      # convert() copies even an RGB image; resize in the file's own mode
      # where that gives the same pixels, and convert only the small output.
      src = im if im.mode in _RESIZE_THEN_CONVERT else im.convert('RGB')
      out = src.resize((size, size), Image.BILINEAR,
                       box=(left * sx, top * sy, (left + w) * sx,
                            (top + h) * sy))
      if out.mode != 'RGB':
        out = out.convert('RGB')
      out = np.asarray(out)
      return out[:, ::-1] if flip else out
  except CorruptImageError:
    raise
  except DECODE_ERRORS as e:
    raise CorruptImageError(
        f'Cannot decode image {where}: {e}. Delete or replace the file, or '
        f"set data.on_corrupt='skip' to skip such images.") from None
