"""data/jpeg_crop.py (partial JPEG decoding through libjpeg-turbo) against
Pillow's full decode of the same file at the same DCT scale, and
decode.decode_crop with it against decode.decode_crop without it.

Skipped, with the reason, where the shim cannot be built (no C compiler or
no libjpeg-turbo headers): decode_crop then decodes with Pillow, which
tests/test_data_decode.py covers either way.
"""

import io
import os
import numpy as np
import pytest
from PIL import Image

from cmim_jax.data import decode
from cmim_jax.data import jpeg_crop

needs_shim = pytest.mark.skipif(
    not jpeg_crop.available(),
    reason=f'jpeg_crop shim unavailable: {jpeg_crop.unavailable_reason()}')


def photo(rng, h, w):
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 // w, y * 255 // h, (x * 3 + y) % 256], -1)
  return np.clip(base + rng.integers(-30, 30, base.shape), 0,
                 255).astype(np.uint8)


def encode(image, **kw):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', **kw)
  return buf.getvalue()


# 4:4:4, 4:2:2, 4:2:0 (Pillow's subsampling 0, 1, 2) and grayscale.
FILES = [('444', 0), ('422', 1), ('420', 2), ('gray', None)]


@needs_shim
@pytest.mark.parametrize('name,subsampling', FILES)
def test_window_pixels_equal_pillows_full_decode(name, subsampling):
  """Every scale 1/1..1/8, windows anywhere (image edges included): the
  decoded columns equal Pillow's full decode, except the outer column of a
  widened window with 4:2:x chroma (no upsampling neighbour there), which
  decode.partial_decode's margin keeps out of what the filter reads."""
  rng = np.random.default_rng(0)
  image = photo(rng, 181, 263)
  if name == 'gray':
    image = image[..., 0]
  data = encode(image, quality=92,
                **({} if subsampling is None else {'subsampling': subsampling}))
  gray = name == 'gray'
  for denom in (1, 2, 4, 8):
    with Image.open(io.BytesIO(data)) as im:
      if denom > 1:
        im.draft(im.mode, (263 // denom, 181 // denom))
      full = np.asarray(im)
    sh, sw = full.shape[:2]
    assert (sw, sh) == (-(-263 // denom), -(-181 // denom))
    for _ in range(12):
      x, y = int(rng.integers(0, sw - 1)), int(rng.integers(0, sh - 1))
      w, h = int(rng.integers(1, sw - x + 1)), int(rng.integers(1, sh - y + 1))
      canvas, x0, cw = jpeg_crop.decode_window(
          data, denom=denom, scaled_size=(sw, sh), channels=1 if gray else 4,
          window=(x, y, w, h))
      assert canvas.shape == ((sh, sw) if gray else (sh, sw, 4))
      assert x0 <= x and x0 + cw >= x + w and x0 + cw <= sw
      got = canvas[y:y + h, x0:x0 + cw]
      got = got if gray else got[..., :3]
      want = full[y:y + h, x0:x0 + cw]
      inner = slice(1 if x0 > 0 else 0, cw - 1 if x0 + cw < sw else cw)
      np.testing.assert_array_equal(got[:, inner], want[:, inner])
      if name in ('444', 'gray'):  # No chroma upsampling: exact everywhere.
        np.testing.assert_array_equal(got, want)
      # Without the canvas (decode_resize's buffer): the same columns.
      region, rx0 = jpeg_crop.decode_region(
          data, denom=denom, scaled_size=(sw, sh), channels=1 if gray else 4,
          window=(x, y, w, h))
      assert rx0 == x0
      np.testing.assert_array_equal(region, canvas[y:y + h, x0:x0 + cw])


@needs_shim
def test_decode_region_refuses_a_buffer_too_small(monkeypatch):
  """The C side checks the region buffer's size against libjpeg's widened
  window (here: no room allowed for the widening, which 4:2:0's 16-pixel
  iMCU columns need at x = 5)."""
  data = encode(photo(np.random.default_rng(4), 40, 64), quality=90,
                subsampling=2)
  monkeypatch.setattr(jpeg_crop, '_MAX_WIDENING', 0)
  with pytest.raises(jpeg_crop.Fallback, match='region buffer of 400 bytes'):
    jpeg_crop.decode_region(data, denom=1, scaled_size=(64, 40), channels=4,
                            window=(5, 3, 20, 5))


@needs_shim
@pytest.mark.parametrize('name,subsampling', FILES)
def test_decode_crop_is_the_same_with_and_without_the_shim(name, subsampling):
  """Training and evaluation crops at full and reduced scale: the same
  pixels (the same decoded pixels, resized with the same geometry)."""
  rng = np.random.default_rng(1)
  image = photo(rng, 520, 400)
  if name == 'gray':
    image = image[..., 0]
  data = encode(image, quality=95,
                **({} if subsampling is None else {'subsampling': subsampling}))
  for size in (224, 64):
    for seed in range(6):
      for train in (True, False):
        def run(partial, seed=seed, train=train, size=size):
          return decode.decode_crop(
              data, 'x.jpg', size=size, partial=partial,
              rng=np.random.default_rng(seed) if train else None)
        got, want = run(None), run(False)
        assert got.shape == want.shape == (size, size, 3)
        np.testing.assert_array_equal(got, want)


@needs_shim
def test_files_the_shim_declines_go_through_pillow():
  """CMYK, truncated and corrupt-scan JPEGs: the shim declines (Fallback);
  decode_crop gives Pillow's answer: a crop, or CorruptImageError with the
  path."""
  rng = np.random.default_rng(2)
  rgb = photo(rng, 120, 90)
  cmyk = Image.fromarray(rgb).convert('CMYK')
  buf = io.BytesIO()
  cmyk.save(buf, 'JPEG', quality=90)
  data = buf.getvalue()
  with pytest.raises(jpeg_crop.Fallback):
    jpeg_crop.decode_window(data, denom=1, scaled_size=(90, 120),
                            channels=4, window=(0, 0, 90, 120))
  for seed in range(3):
    np.testing.assert_array_equal(
        decode.decode_crop(data, 'c.jpg', size=32,
                           rng=np.random.default_rng(seed)),
        decode.decode_crop(data, 'c.jpg', size=32, partial=False,
                           rng=np.random.default_rng(seed)))

  good = encode(rgb, quality=90)
  truncated = good[:len(good) // 3]
  with pytest.raises(jpeg_crop.Fallback, match='end-of-image'):
    jpeg_crop.decode_window(truncated, denom=1, scaled_size=(90, 120),
                            channels=4, window=(0, 0, 90, 10))
  for seed in range(3):  # Even a window in the intact part: the file fails.
    with pytest.raises(decode.CorruptImageError, match='t.jpg'):
      decode.decode_crop(truncated, 't.jpg', size=32,
                         rng=np.random.default_rng(seed))

  # A scan with garbage in the middle: libjpeg warns, the shim declines.
  scan = good.index(b'\xff\xda') + 200
  corrupt = good[:scan] + b'\xff\xd0' * 8 + good[scan + 16:]
  with pytest.raises(jpeg_crop.Fallback):
    jpeg_crop.decode_window(corrupt, denom=1, scaled_size=(90, 120),
                            channels=4, window=(0, 0, 90, 120))
  with pytest.raises(jpeg_crop.Fallback):  # Not a JPEG at all.
    jpeg_crop.decode_window(b'not a jpeg\xff\xd9', denom=1,
                            scaled_size=(90, 120), channels=4,
                            window=(0, 0, 90, 120))
  with pytest.raises(jpeg_crop.Fallback):  # Not the size the caller expects.
    jpeg_crop.decode_window(good, denom=2, scaled_size=(90, 120),
                            channels=4, window=(0, 0, 90, 120))


@pytest.mark.parametrize('why', ['no compiler', 'none on PATH', 'disabled'])
def test_unbuildable_shim_falls_back_to_pillow(why, tmp_path, monkeypatch):
  """No compiler (CC names a missing one, or CC unset and none on PATH) and
  an empty cache, or CMIM_JPEG_CROP=0: the shim reports why, and decode_crop
  still works (through Pillow)."""
  monkeypatch.setattr(jpeg_crop, '_state', {})  # Forget the loaded shim.
  monkeypatch.delenv('CMIM_CACHE_DIR', raising=False)
  monkeypatch.setenv('CMIM_JAX_CACHE', str(tmp_path))
  if why == 'none on PATH':
    monkeypatch.delenv('CC', raising=False)
    monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  else:
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
  if why == 'disabled':
    monkeypatch.setenv('CMIM_JPEG_CROP', '0')
  assert not jpeg_crop.available()
  assert {'no compiler': 'no-such-cc', 'none on PATH': 'no C compiler',
          'disabled': 'CMIM_JPEG_CROP=0'}[why] in jpeg_crop.unavailable_reason()
  assert not list(tmp_path.rglob('*.so'))
  data = encode(photo(np.random.default_rng(3), 40, 50), quality=90)
  out = decode.decode_crop(data, 'x', size=16, rng=np.random.default_rng(0))
  assert out.shape == (16, 16, 3)
  with pytest.raises(jpeg_crop.Fallback,
                     match='no-such-cc|no C compiler|CMIM_JPEG_CROP'):
    jpeg_crop.decode_window(data, denom=1, scaled_size=(50, 40), channels=4,
                            window=(0, 0, 50, 40))


def test_the_shim_is_built_once_into_the_cache(tmp_path, monkeypatch):
  """A fresh cache folder: the first use builds the library there (named by
  the source's hash), the next load reuses it without a compiler."""
  if not jpeg_crop.available():
    pytest.skip(f'jpeg_crop shim unavailable: '
                f'{jpeg_crop.unavailable_reason()}')
  monkeypatch.setattr(jpeg_crop, '_state', {})
  monkeypatch.delenv('CMIM_CACHE_DIR', raising=False)
  monkeypatch.setenv('CMIM_JAX_CACHE', str(tmp_path))
  assert jpeg_crop.available(), jpeg_crop.unavailable_reason()
  built = list(tmp_path.glob('jpeg_crop/jpeg_crop-*.so'))
  assert built == [tmp_path / 'jpeg_crop' / os.path.basename(
      jpeg_crop.library_path())]
  # No compiler, named by CC or on PATH: the cached build still loads.
  monkeypatch.setattr(jpeg_crop, '_state', {})
  monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
  assert jpeg_crop.available(), jpeg_crop.unavailable_reason()
  monkeypatch.setattr(jpeg_crop, '_state', {})
  monkeypatch.delenv('CC')
  monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
  assert jpeg_crop.available(), jpeg_crop.unavailable_reason()
  assert list(tmp_path.rglob('*.so')) == built
