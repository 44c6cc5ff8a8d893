"""data/decode.py against torchvision's PIL path (decode, convert('RGB'),
crop, bilinear resize, flip), written out here with PIL calls.

One documented difference: the window is resized with ``resize(box=...)``
(as the in-memory crop in ``augment`` is), whose filter reads the pixels
just outside the window for the output's outermost rows and columns where
crop-then-resize clamps at the window's edge; inside that one-pixel frame
the two differ by at most 1 (the filter weights' rounding, from the
window's offset in the image).
"""

import io

import numpy as np
import pytest
from PIL import Image

from cmim_jax.data import augment
from cmim_jax.data import decode


def torchvision_path(data, rng, size):
  """ImageFolder's loader, RandomResizedCrop, RandomHorizontalFlip."""
  with Image.open(io.BytesIO(data)) as im:
    im = im.convert('RGB')
    top, left, h, w = augment.sample_resized_crop_box(rng, im.height, im.width)
    im = im.crop((left, top, left + w, top + h)).resize((size, size),
                                                         Image.BILINEAR)
    if rng.random() < 0.5:
      im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def assert_same_inside_frame(got, want):
  diff = np.abs(got.astype(int) - want)
  assert diff[1:-1, 1:-1].max() <= 1
  assert diff.max() <= 6 and diff.mean() < 0.5, (diff.max(), diff.mean())


def encode(image, fmt='JPEG', **kw):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kw)
  return buf.getvalue()


def photo(rng, h, w, channels=3):
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 // (w - 1), y * 255 // (h - 1),
                   (x + y) * 127 // (w + h - 2)], -1)[..., :channels]
  out = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255)
  return out.astype(np.uint8).squeeze()


@pytest.mark.parametrize('channels', [3, 1])
def test_full_decode_is_the_torchvision_path_inside_the_frame(channels):
  """RGB and grayscale JPEGs (grayscale is resized before its RGB convert,
  which gives the same pixels) and a palette PNG (converted first)."""
  rng = np.random.default_rng(0)
  data = encode(photo(rng, 150, 210, channels), quality=90)
  for seed in range(6):
    got = decode.decode_crop(data, 'x.jpg', size=40, reduced=False,
                             rng=np.random.default_rng(seed))
    want = torchvision_path(data, np.random.default_rng(seed), 40)
    assert got.shape == (40, 40, 3) and got.dtype == np.uint8
    assert_same_inside_frame(got, want)


def test_palette_and_rgba_images_are_converted_first():
  rng = np.random.default_rng(1)
  rgb = photo(rng, 90, 70)
  for data in (encode(rgb, 'PNG'),
               encode(np.dstack([rgb, rgb[..., :1]]), 'PNG'),
               encode(rgb, 'GIF')):
    for seed in range(3):
      assert_same_inside_frame(
          decode.decode_crop(data, 'x', size=24,
                             rng=np.random.default_rng(seed)),
          torchvision_path(data, np.random.default_rng(seed), 24))


def test_reduced_decode_stays_close_on_large_images():
  """A 1/2-1/8 scale decode differs from the full decode only by the
  DCT-domain reduction: a small mean difference, same window and flip."""
  rng = np.random.default_rng(2)
  data = encode(photo(rng, 900, 1200), quality=96, subsampling=0)
  diffs = []
  for seed in range(8):
    full = decode.decode_crop(data, 'big.jpg', size=64, reduced=False,
                              rng=np.random.default_rng(seed))
    fast = decode.decode_crop(data, 'big.jpg', size=64,
                              rng=np.random.default_rng(seed))
    diffs.append(np.abs(full.astype(float) - fast).mean())
  assert max(diffs) < 3, diffs
  # A wrong window or flip would differ by tens of levels on this image.
  wrong = decode.decode_crop(data, 'big.jpg', size=64,
                             rng=np.random.default_rng(100))
  assert np.abs(full.astype(float) - wrong).mean() > 10


def test_crop_window_from_the_header_only():
  rng = np.random.default_rng(3)
  data = encode(photo(rng, 120, 160), quality=90)
  with Image.open(io.BytesIO(data)) as im:
    assert im.size == (160, 120)
    top, left, h, w, flip = decode.crop_window(None, 120, 160, 0.875)
  assert (h, w, flip) == (105, 105, False)
  assert (top, left) == ((120 - 105) // 2, (160 - 105) // 2)
  box = decode.crop_window(np.random.default_rng(0), 120, 160, 0.875)
  r = np.random.default_rng(0)
  assert box[:4] == augment.sample_resized_crop_box(r, 120, 160)
  assert box[4] == (r.random() < 0.5)
