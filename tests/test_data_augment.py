"""Augmentation and normalisation: host (numpy/PIL) and device (jax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmim_jax import input_pipeline as ip
from cmim_jax.data import augment as aug
from cmim_jax.data import catalogue

PAD = 4


def _info(**kw):
  base = dict(name='cifar10', source='folder', num_classes=10,
              image_shape=(32, 32, 3), num_train=1, num_eval=1,
              mean=catalogue.CIFAR10_MEAN, std=catalogue.CIFAR10_STD,
              augment='device', crop_padding=PAD)
  base.update(kw)
  return ip.DatasetInfo(**base)


def _images(b=16, h=32, w=32, c=3, seed=0):
  return np.random.default_rng(seed).integers(1, 256, (b, h, w, c),
                                              dtype=np.uint8)


def _window_of(crop, image, pad):
  """(dy, dx, flipped) such that crop is that window of the padded image."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  found = []
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      window = padded[dy:dy + h, dx:dx + w]
      for flipped, cand in ((False, window), (True, window[:, ::-1])):
        if np.array_equal(crop, cand):
          found.append((dy, dx, flipped))
  return found


def test_device_crop_is_a_shifted_window_of_the_zero_padded_image():
  images = _images(64)
  out = np.asarray(jax.jit(aug.pad_crop_flip, static_argnums=2)(
      aug.example_keys(jax.random.key(0), 64), images, PAD))
  assert out.shape == images.shape and out.dtype == np.uint8
  windows = [_window_of(o, i, PAD) for o, i in zip(out, images)]
  assert all(len(w) == 1 for w in windows)  # Random pixels: a unique match.
  dys, dxs, flips = zip(*[w[0] for w in windows])
  assert 0 < sum(flips) < len(flips)  # Both flipped and not.
  assert min(dys) == 0 and max(dys) == 2 * PAD  # Offsets span [0, 2 * pad].
  assert len(set(dxs)) > 5


def test_device_augmentation_is_deterministic_given_rng():
  images = _images(8)
  f = jax.jit(lambda r, x: aug.pad_crop_flip(aug.example_keys(r, 8), x, PAD))
  a, b = f(jax.random.key(1), images), f(jax.random.key(1), images)
  c = f(jax.random.key(2), images)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_host_crop_matches_the_device_definition():
  images = _images(32)
  rng = np.random.default_rng(0)
  offsets, flips = aug.pad_crop_flip_params(rng, 32, PAD)
  out = aug.pad_crop_flip_np(images, offsets, flips, PAD)
  for o, i, off, fl in zip(out, images, offsets, flips):
    assert _window_of(o, i, PAD) == [(off[0], off[1], bool(fl))]


def test_preprocess_normalises_with_one_mean_std():
  info = _info()
  images = _images(4)
  expected = (images / 255.0 - np.array(info.mean)) / np.array(info.std)
  for train, augment in ((False, 'device'), (True, 'host'), (True, 'none')):
    out = ip.preprocess_on_device(None, jnp.asarray(images), info=info,
                                  train=train, augment=augment)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_preprocess_device_augments_only_in_training():
  info = _info()
  images = jnp.asarray(_images(8))
  step = jax.jit(lambda r, x: ip.preprocess_on_device(
      r, x, info=info, train=True, augment='auto'))
  out = np.asarray(step(jax.random.key(0), images))
  plain = ip.preprocess_on_device(None, images, info=info, train=False,
                                  augment='device')
  assert not np.allclose(out, plain)
  # Undo the normalisation: a window of the padded image, padding = 0 (black).
  back = np.rint((out * np.array(info.std) + np.array(info.mean)) * 255)
  back = back.astype(np.uint8)
  assert all(len(_window_of(b, i, PAD)) == 1
             for b, i in zip(back, np.asarray(images)))
  np.testing.assert_array_equal(
      out, step(jax.random.key(0), images))  # Deterministic.


def test_preprocess_rejects_bad_calls():
  info = _info()
  with pytest.raises(ValueError, match='needs an rng'):
    ip.preprocess_on_device(None, jnp.zeros((2, 32, 32, 3), jnp.uint8),
                            info=info, train=True, augment='device')
  with pytest.raises(ValueError, match='do not match'):
    ip.preprocess_on_device(None, jnp.zeros((2, 8, 8, 3), jnp.uint8),
                            info=info, train=False, augment='none')
  with pytest.raises(ValueError, match='is not one of'):
    ip.preprocess_on_device(None, jnp.zeros((2, 32, 32, 3), jnp.uint8),
                            info=info, train=False, augment='gpu')
  with pytest.raises(ValueError, match='crop padding'):
    ip.preprocess_on_device(jax.random.key(0),
                            jnp.zeros((2, 32, 32, 3), jnp.uint8),
                            info=_info(crop_padding=0), train=True,
                            augment='device')


def test_info_is_hashable_for_jit_static_args():
  a, b = _info(), _info(class_names=('x',))
  assert hash(a) == hash(b) and a == b


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  fractions, ratios = [], []
  for _ in range(2000):
    top, left, h, w = aug.sample_resized_crop_box(rng, 300, 400)
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    fractions.append(h * w / (300 * 400))
    ratios.append(w / h)
  assert 0.07 < min(fractions) and max(fractions) <= 1.0
  assert np.mean(fractions) > 0.3  # Uniform in [0.08, 1] on accepted draws.
  assert min(ratios) > 0.70 and max(ratios) < 1.40
  # A very thin image: no draw fits, the fallback clips the ratio.
  assert aug.sample_resized_crop_box(np.random.default_rng(0), 10, 1000,
                                     attempts=0) == (0, 493, 10, 13)


def test_imagenet_style_host_crops():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
  out = aug.random_resized_crop_flip_np(image, np.random.default_rng(1), 24)
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  again = aug.random_resized_crop_flip_np(image, np.random.default_rng(1), 24)
  np.testing.assert_array_equal(out, again)
  # Evaluation: central 0.875 of the shorter side, resized; a constant image
  # stays constant, and a vertical gradient keeps its middle row.
  flat = np.full((40, 60, 3), 77, np.uint8)
  np.testing.assert_array_equal(aug.center_crop_resize_np(flat, 16), 77)
  ramp = np.repeat(np.linspace(0, 255, 64)[:, None], 96, 1).astype(np.uint8)
  ramp = np.stack([ramp] * 3, -1)
  c = aug.center_crop_resize_np(ramp, 56).astype(int)
  assert abs(c[28, 28, 0] - 128) < 6 and c[0, 0, 0] > 10 and c[-1, 0, 0] < 245


def _reference_crops(rng, images, pad, index_offset=0):
  """numpy pad-crop-flip with each example's draws spelt out by hand.

  Example j of the global batch: key fold_in(rng, j), split in two; the
  first draws the (row, column) offset as randint of shape (1, 2) in
  [0, 2 pad], the second the flip as bernoulli(0.5) of shape (1,). These are
  the draws the trainer made before the data package owned the scheme;
  runs resumed across that change keep their crops.
  """
  offsets, flips = [], []
  for j in range(len(images)):
    crop_key, flip_key = jax.random.split(
        jax.random.fold_in(rng, index_offset + j))
    offsets.append(np.asarray(
        jax.random.randint(crop_key, (1, 2), 0, 2 * pad + 1))[0])
    flips.append(bool(jax.random.bernoulli(flip_key, 0.5, (1,))[0]))
  return aug.pad_crop_flip_np(images, np.array(offsets), np.array(flips), pad)


def test_device_crops_follow_the_per_example_key_scheme():
  images = _images(8)
  rng = jax.random.fold_in(jax.random.key(3), 17)
  for offset in (0, 40):
    got = aug.pad_crop_flip(aug.example_keys(rng, 8, offset),
                            jnp.asarray(images), PAD)
    np.testing.assert_array_equal(got, _reference_crops(rng, images, PAD,
                                                         offset))


def test_example_keys_are_fold_in_of_the_global_index():
  rng = jax.random.key(9)
  keys = aug.example_keys(rng, 3, 5)
  for j in range(3):
    np.testing.assert_array_equal(
        jax.random.key_data(keys[j]),
        jax.random.key_data(jax.random.fold_in(rng, 5 + j)))


@pytest.mark.parametrize('n', [1, 2, 4, 8])
def test_device_augmentation_does_not_depend_on_device_count(n):
  """A global batch split over n devices gets the crops of one device."""
  info = _info()
  batch = 16
  images = jnp.asarray(np.repeat(_images(1), batch, axis=0))  # All alike.
  rng = jax.random.key(0)
  whole = np.asarray(ip.preprocess_on_device(rng, images, info=info,
                                             train=True, augment='device'))
  # Identical images: any sameness across rows would come from the keys.
  assert len({r.tobytes() for r in whole}) > batch // 2
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('data',))
  spec = jax.sharding.PartitionSpec('data')

  def per_device(x):
    offset = jax.lax.axis_index('data') * x.shape[0]
    return ip.preprocess_on_device(rng, x, info=info, train=True,
                                   augment='device', index_offset=offset)

  f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec,
                            out_specs=spec))
  # Pixels differ by >= 1/255/std ~ 0.016 where a crop differs; the
  # tolerance only absorbs the jitted normalisation's fused multiply-add.
  np.testing.assert_allclose(np.asarray(f(images)), whole, rtol=0, atol=1e-5)
