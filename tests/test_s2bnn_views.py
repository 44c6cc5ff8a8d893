"""MoCo v2 views on device (cmim_jax/data/views.py): each op against numpy,
PIL or colorsys, the crop's geometry, the switches, and views that do not
depend on the device count."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageEnhance

from cmim_jax.data import views


def _image(seed=0, shape=(12, 12, 3)):
  return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


@pytest.mark.parametrize("name,factor", [("brightness", 1.3), ("contrast", 0.7),
                                         ("saturation", 1.4), ("contrast", 1.35)])
def test_brightness_contrast_saturation_match_pil(name, factor):
  """PIL's ImageEnhance (what torchvision's PIL path calls), within its uint8 rounding."""
  img = _image()
  ours = {"brightness": views.adjust_brightness, "contrast": views.adjust_contrast,
          "saturation": views.adjust_saturation}[name](jnp.asarray(img / 255.0, jnp.float32),
                                                        factor)
  enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
              "saturation": ImageEnhance.Color}[name]
  want = np.asarray(enhancer(Image.fromarray(img)).enhance(factor)) / 255.0
  np.testing.assert_allclose(ours, want, atol=2.5 / 255)


def test_hsv_round_trip_and_hue_shift_match_colorsys():
  rgb = np.random.default_rng(1).random((50, 3))
  rgb[:5] = rgb[:5, :1]  # Gray pixels: hue and saturation 0.
  rgb[5] = 0.0
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
  np.testing.assert_allclose(views.rgb_to_hsv(jnp.asarray(rgb)), hsv, atol=1e-6)
  np.testing.assert_allclose(views.hsv_to_rgb(jnp.asarray(hsv)), rgb, atol=1e-6)
  for shift in (0.07, -0.1):
    want = np.array([colorsys.hsv_to_rgb((h + shift) % 1.0, s, v) for h, s, v in hsv])
    np.testing.assert_allclose(views.adjust_hue(jnp.asarray(rgb[None]), shift)[0], want,
                               atol=1e-5)


def test_blur_matches_numpy_convolution_with_replicated_edges():
  img = np.random.default_rng(2).random((10, 7, 3))
  sigma = 1.3
  r = int(np.ceil(3 * views.BLUR_SIGMA[1]))
  w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  w /= w.sum()
  padded = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
  rows = sum(w[i] * padded[i:i + 10] for i in range(2 * r + 1))
  want = sum(w[i] * rows[:, i:i + 7] for i in range(2 * r + 1))
  got = jnp.einsum("ij,jwc->iwc", views.blur_matrix(sigma, 10), img)
  got = jnp.einsum("ij,hjc->hic", views.blur_matrix(sigma, 7), got)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_resized_crop_is_bilinear_with_half_pixel_centres():
  img = np.random.default_rng(3).random((12, 12, 2))
  top, left, h, w = 2.0, 3.0, 6.0, 6.0  # Upscaled x2, every sample inside the image.
  out = views.resized_crop(jnp.asarray(img), jnp.asarray([top, left, h, w]))
  ys = top + (np.arange(12) + 0.5) * h / 12 - 0.5
  xs = left + (np.arange(12) + 0.5) * w / 12 - 0.5
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  want = ((1 - fy) * (1 - fx) * img[y0][:, x0] + (1 - fy) * fx * img[y0][:, x0 + 1]
          + fy * (1 - fx) * img[y0 + 1][:, x0] + fy * fx * img[y0 + 1][:, x0 + 1])
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_crop_boxes_fit_and_follow_the_scale_and_ratio():
  boxes = np.asarray(jax.vmap(lambda k: views.crop_box(k, 32, 32, (0.2, 1.0)))(
      jax.random.split(jax.random.PRNGKey(0), 500)))
  top, left, h, w = boxes.T
  assert np.all(h >= 1) and np.all(w >= 1) and np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 32) and np.all(left + w <= 32)
  area = h * w / 1024
  assert area.min() > 0.15 and area.max() <= 1.0 and np.mean(area < 0.5) > 0.2
  assert np.all((w / h > 0.6) & (w / h < 1.6))
  assert len(set(map(tuple, boxes))) > 300  # Examples draw different boxes.


def test_switches_identity_and_grayscale():
  img = _image(4, (2, 16, 16, 3))
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  plain = views.ViewSpec(crop_scale=(1.0, 1.0), jitter_prob=0.0, gray_prob=0.0, flip=False)
  out = views.moco_views(jax.random.PRNGKey(0), img, spec=plain, mean=mean, std=std)
  np.testing.assert_allclose(out, (img / 255.0 - mean) / np.asarray(std), atol=1e-5)
  gray = views.ViewSpec(crop_scale=(1.0, 1.0), jitter_prob=0.0, gray_prob=1.0, flip=False)
  out = np.asarray(views.moco_views(jax.random.PRNGKey(0), img, spec=gray, mean=(0.5,) * 3,
                                    std=(1.0,) * 3)) + 0.5
  luma = img / 255.0 @ np.array([0.299, 0.587, 0.114])
  for c in range(3):
    np.testing.assert_allclose(out[..., c], luma, atol=1e-5)
  with pytest.raises(ValueError, match="crop_scale"):
    views.ViewSpec(crop_scale=(0.0, 1.0))
  with pytest.raises(ValueError, match="jitter_prob"):
    views.ViewSpec(jitter_prob=1.5)


def test_views_do_not_depend_on_the_device_count():
  img = _image(5, (16, 24, 24, 3))
  spec = views.ViewSpec(jitter_prob=0.8, blur_prob=0.5)
  kw = dict(spec=spec, mean=(0.5,) * 3, std=(0.25,) * 3)
  key = jax.random.PRNGKey(3)
  one = jax.jit(lambda x: views.moco_views(key, x, **kw))(img)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  eight = jax.jit(jax.shard_map(
      lambda x: views.moco_views(key, x, index_offset=jax.lax.axis_index("data") * 2, **kw),
      mesh=mesh, in_specs=P("data"), out_specs=P("data")))(img)
  np.testing.assert_allclose(eight, one, atol=1e-5)
  # The views differ from one another and from the plain image.
  assert np.abs(np.asarray(one) - ((img / 255.0 - 0.5) / 0.25)).mean() > 0.1
  other = views.moco_views(jax.random.PRNGKey(4), img, **kw)
  assert np.abs(np.asarray(one) - np.asarray(other)).mean() > 0.1
