"""data/resample.c (through jpeg_crop.resize and jpeg_crop.decode_resize):
bit-equal to PIL.Image.resize(size, BILINEAR, box=box) of the installed
Pillow, with every kernel this CPU runs (scalar, SSE4.1, AVX2).

Skipped, with the reason, where the shim cannot be built (no C compiler or
no libjpeg-turbo headers): decode_crop then resizes with Pillow.
"""

import io

import numpy as np
import pytest
from PIL import Image

from cmim_jax.data import decode
from cmim_jax.data import jpeg_crop

pytestmark = pytest.mark.skipif(
    not jpeg_crop.available(),
    reason=f'jpeg_crop shim unavailable: {jpeg_crop.unavailable_reason()}')


def levels():
  """The kernels to compare: scalar and each SIMD level the CPU runs."""
  return list(range(jpeg_crop.simd_level() + 1))


def pillow(src, box, size, flip):
  mode = 'L' if src.ndim == 2 else 'RGBX'
  height, width = src.shape[:2]
  im = Image.frombuffer(mode, (width, height), src, 'raw', mode, 0, 1)
  out = np.asarray(im.resize((size, size), Image.BILINEAR,
                             box=box).convert('RGB'))
  return out[:, ::-1] if flip else out


def random_box(rng, width, height):
  x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
  x1, y1 = rng.uniform(x0, width), rng.uniform(y0, height)
  if rng.random() < 0.2:  # Whole pixels: Pillow's crop shortcut when sizes match.
    x0, y0, x1, y1 = (float(int(v)) for v in (x0, y0, x1, y1))
  if rng.random() < 0.1:
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
  return x0, y0, x1, y1


def test_resize_is_pillows_bit_for_bit():
  """Random images, boxes and output sizes: down- and upscaling, tall and
  wide images (Pillow's two pass orders), RGBX and grayscale, flipped or
  not; every kernel gives Pillow's pixels."""
  rng = np.random.default_rng(0)
  seen_orders = set()
  for _ in range(250):
    height, width = (int(v) for v in rng.integers(1, 160, 2))
    size = int(rng.integers(1, 130))
    gray = rng.random() < 0.3
    src = rng.integers(0, 256, (height, width) if gray else
                       (height, width, 4), np.uint8)
    box = random_box(rng, width, height)
    if box[2] - box[0] < 1e-3 or box[3] - box[1] < 1e-3:
      continue  # Pillow's float box can round to empty.
    flip = bool(rng.random() < 0.5)
    want = pillow(src, box, size, flip)
    seen_orders.add(height - size > max(0, 2 * (width - size)))
    for simd in levels():
      got = jpeg_crop.resize(src, box, size, flip=flip, simd=simd)
      np.testing.assert_array_equal(got, want, err_msg=f'simd {simd} '
                                    f'{height}x{width} {box} -> {size}')
  assert seen_orders == {True, False}


def test_resize_of_a_region_and_into_a_batch_row():
  """The caller holds only the rows and columns the filter reads (origin
  inside the image) and writes into a row of a batch; asking for a box the
  region does not cover is declined, not read out of bounds."""
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (300, 200, 4), np.uint8)
  box, size = (37.3, 51.9, 171.2, 260.4), 64
  want = pillow(image, box, size, flip=True)
  x0, y0, x1, y1 = 34, 48, 175, 264  # Filter support 2 px at this scale.
  region = np.ascontiguousarray(image[y0:y1, x0:x1])
  batch = np.zeros((3, size, size, 3), np.uint8)
  for simd in levels():
    got = jpeg_crop.resize(region, box, size, flip=True, origin=(x0, y0),
                           image_size=(200, 300), simd=simd, out=batch[1])
    assert got is batch[1] or np.shares_memory(got, batch)
    np.testing.assert_array_equal(batch[1], want)
    assert not batch[0].any() and not batch[2].any()
  with pytest.raises(jpeg_crop.Fallback, match='status'):
    jpeg_crop.resize(region[3:], box, size, origin=(x0, y0 + 3),
                     image_size=(200, 300))
  with pytest.raises(ValueError, match='out must be'):
    jpeg_crop.resize(region, box, size, origin=(x0, y0),
                     image_size=(200, 300), out=np.zeros((size, size, 4),
                                                         np.uint8))


@pytest.mark.parametrize('subsampling', [0, 2, None])
def test_decode_resize_is_the_full_decode_resized_by_pillow(subsampling):
  """One call (decode the window, resize, flip) against Pillow's full
  decode at the same DCT scale resized by Pillow, for every kernel: 4:4:4,
  4:2:0 and grayscale files, random crops at several scales."""
  rng = np.random.default_rng(2)
  y, x = np.mgrid[0:333, 0:517]
  image = np.stack([x % 256, y % 256, (x + 2 * y) % 256], -1)
  image = np.clip(image + rng.integers(-25, 25, image.shape), 0, 255)
  image = image.astype(np.uint8)
  if subsampling is None:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', quality=93,
                              **({} if subsampling is None else
                                 {'subsampling': subsampling}))
  data = buf.getvalue()
  for seed in range(8):
    size = (224, 96, 40, 17)[seed % 4]
    top, left, h, w, flip = decode.crop_window(np.random.default_rng(seed),
                                               333, 517, 0.875)
    denom, scaled, box = decode.scale_and_box(517, 333, (top, left, h, w),
                                              size)
    with Image.open(io.BytesIO(data)) as im:
      if denom > 1:
        im.draft(im.mode, (517 // denom, 333 // denom))
      assert im.size == scaled
      want = np.asarray(im.resize((size, size), Image.BILINEAR,
                                  box=box).convert('RGB'))
    want = want[:, ::-1] if flip else want
    for simd in levels():
      got = jpeg_crop.decode_resize(
          data, denom=denom, scaled_size=scaled,
          channels=1 if subsampling is None else 4,
          window=decode.read_window(box, scaled, size), box=box, size=size,
          flip=flip, simd=simd)
      np.testing.assert_array_equal(got, want, err_msg=f'simd {simd}')


def test_decode_crop_without_the_fused_resize_is_the_same(monkeypatch):
  """With the installed Pillow the self-check passes; were it to fail
  (another Pillow's arithmetic), or with CMIM_JPEG_RESIZE=0, decode_crop
  resizes with Pillow: the same pixels either way here.
  CMIM_RESAMPLE_SIMD=0 forces the scalar kernels."""
  assert jpeg_crop.resize_matches_pillow()
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (240, 320, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', quality=96, subsampling=0)
  data = buf.getvalue()
  fused = [decode.decode_crop(data, 'x', size=64,
                              rng=np.random.default_rng(s)) for s in range(4)]
  monkeypatch.setenv('CMIM_RESAMPLE_SIMD', '0')
  scalar = [decode.decode_crop(data, 'x', size=64,
                               rng=np.random.default_rng(s)) for s in range(4)]
  monkeypatch.setenv('CMIM_JPEG_RESIZE', '0')
  plain = [decode.decode_crop(data, 'x', size=64,
                              rng=np.random.default_rng(s)) for s in range(4)]
  monkeypatch.delenv('CMIM_JPEG_RESIZE')
  monkeypatch.setitem(jpeg_crop._state, 'pillow_ok', False)
  assert not jpeg_crop.resize_enabled()
  unchecked = [decode.decode_crop(data, 'x', size=64,
                                  rng=np.random.default_rng(s))
               for s in range(4)]
  np.testing.assert_array_equal(fused, plain)
  np.testing.assert_array_equal(scalar, plain)
  np.testing.assert_array_equal(unchecked, plain)
