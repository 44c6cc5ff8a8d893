r"""MoCo v2 augmentation on device: the views of label-free training.

One view of an image is (MoCo v2, Chen et al. 2020, as S2-BNN's
``--aug-plus``):

1. random resized crop: area fraction U(``crop_scale``) of the image, aspect
   ratio log-uniform in (3/4, 4/3) (ten tries, then the whole image; for a
   square image the fallback is the image itself), resized back to the
   image's size, bilinear with antialiasing;
2. colour jitter with probability ``jitter_prob``: brightness, contrast,
   saturation factors U(1 - s, 1 + s), a hue shift U(-h, h), in a random
   order (torchvision's ``ColorJitter``);
3. grayscale with probability ``gray_prob`` (kept at C channels);
4. Gaussian blur with probability ``blur_prob``, sigma U(0.1, 2.0) pixels
   (MoCo v2 uses it for 224-pixel ImageNet crops only);
5. horizontal flip with probability 1/2;

then ``(x - mean) / std``. Everything works on float ``[0, 1]`` images;
torchvision's PIL path rounds to uint8 between the steps, this does not.

Example ``j`` of the global batch draws its view from ``fold_in(rng, j)``
(:func:`~cmim_jax.data.augment.example_keys`), so a view does not depend on
how many devices share the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from cmim_jax.data import augment as _augment

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision.
BLUR_SIGMA = (0.1, 2.0)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """Static settings of a view (hashable: part of the step's static task).

  Attributes:
    crop_scale: (lo, hi) area fraction of the random resized crop.
    jitter: (brightness, contrast, saturation, hue) strengths.
    jitter_prob: probability of the colour jitter (MoCo v2: 0.8; S2-BNN's code: 0.6).
    gray_prob: probability of turning the view gray.
    blur_prob: probability of the Gaussian blur.
    flip: random horizontal flips.
  """
  crop_scale: tuple[float, float] = (0.2, 1.0)
  jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
  jitter_prob: float = 0.8
  gray_prob: float = 0.2
  blur_prob: float = 0.0
  flip: bool = True

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"views.crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1.")
    if min(self.jitter) < 0 or self.jitter[3] > 0.5:
      raise ValueError(f"views.jitter={self.jitter} must be >= 0 with hue <= 0.5.")
    for name in ("jitter_prob", "gray_prob", "blur_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"views.{name}={getattr(self, name)} must be in [0, 1].")


# ------------------------------------------------------------------ the ops


def gray(image: jax.Array) -> jax.Array:
  """Luma ``f32[H, W, 1]`` of an RGB image (the image itself when it has one channel)."""
  if image.shape[-1] == 1:
    return image
  return jnp.tensordot(image, jnp.asarray(_GRAY, image.dtype), axes=[[-1], [0]])[..., None]


def rgb_to_hsv(image: jax.Array) -> jax.Array:
  """``[..., 3]`` RGB in [0, 1] -> HSV, hue in [0, 1) (``colorsys``'s convention)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc, minc = jnp.max(image, -1), jnp.min(image, -1)
  span = maxc - minc
  flat = span == 0
  s = jnp.where(maxc > 0, span / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  d = jnp.where(flat, 1.0, span)
  rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(flat, 0.0, jnp.mod(h / 6.0, 1.0))
  return jnp.stack([h, s, maxc], -1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
  """Inverse of :func:`rgb_to_hsv`."""
  h, s, v = image[..., 0], image[..., 1], image[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i, 6).astype(jnp.int32)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = jnp.stack([jnp.stack(c, -1) for c in
                     [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]], 0)
  return jnp.take_along_axis(table, i[None, ..., None], axis=0)[0]


def adjust_brightness(image, factor):
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
  mean = jnp.mean(gray(image))
  return jnp.clip(factor * image + (1 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
  if image.shape[-1] == 1:
    return image
  return jnp.clip(factor * image + (1 - factor) * gray(image), 0.0, 1.0)


def adjust_hue(image, shift):
  if image.shape[-1] == 1:
    return image
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  return hsv_to_rgb(hsv)


def color_jitter(key: jax.Array, image: jax.Array, strength) -> jax.Array:
  """torchvision's ``ColorJitter(*strength)``: four adjustments in a random order."""
  kb, kc, ks, kh, korder = jax.random.split(key, 5)
  b, c, s, h = strength
  factors = (jax.random.uniform(kb, (), minval=max(0.0, 1 - b), maxval=1 + b),
             jax.random.uniform(kc, (), minval=max(0.0, 1 - c), maxval=1 + c),
             jax.random.uniform(ks, (), minval=max(0.0, 1 - s), maxval=1 + s),
             jax.random.uniform(kh, (), minval=-h, maxval=h))
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  order = jax.random.permutation(korder, 4)
  branches = [lambda x, i=i: ops[i](x, factors[i]) for i in range(4)]
  for position in range(4):
    image = jax.lax.switch(order[position], branches, image)
  return image


def blur_matrix(sigma: jax.Array, n: int) -> jax.Array:
  """``f32[n, n]``: a 1-d Gaussian blur of std ``sigma`` pixels, edges replicated."""
  radius = int(math.ceil(3 * BLUR_SIGMA[1]))
  offsets = jnp.arange(-radius, radius + 1)
  weights = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  weights = weights / jnp.sum(weights)
  source = jnp.clip(jnp.arange(n)[:, None] + offsets[None, :], 0, n - 1)  # [n, taps]
  return jnp.sum(jax.nn.one_hot(source, n) * weights[None, :, None], axis=1)


def gaussian_blur(key: jax.Array, image: jax.Array) -> jax.Array:
  """Separable Gaussian blur, sigma U(0.1, 2.0) pixels (MoCo v2's ``GaussianBlur``)."""
  sigma = jax.random.uniform(key, (), minval=BLUR_SIGMA[0], maxval=BLUR_SIGMA[1])
  h, w = image.shape[:2]
  image = jnp.einsum("ij,jwc->iwc", blur_matrix(sigma, h), image)
  return jnp.einsum("ij,hjc->hic", blur_matrix(sigma, w), image)


def crop_box(key: jax.Array, height: int, width: int, scale, ratio=(3 / 4, 4 / 3),
             attempts: int = 10) -> jax.Array:
  """``f32[4]`` (top, left, h, w) of a random resized crop (torchvision's rule)."""
  ka, kr, kt, kl = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(ka, (attempts,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(kr, (attempts,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)
  # The fallback (no try fits): the largest central window of clipped ratio.
  fw = width if ratio[0] <= width / height <= ratio[1] else (
      width if width / height < ratio[0] else round(height * ratio[1]))
  fh = height if ratio[0] <= width / height <= ratio[1] else (
      round(width / ratio[0]) if width / height < ratio[0] else height)
  h = jnp.where(ok[first], h[first], fh)
  w = jnp.where(ok[first], w[first], fw)
  top = jnp.floor(jax.random.uniform(kt, ()) * (height - h + 1))
  left = jnp.floor(jax.random.uniform(kl, ()) * (width - w + 1))
  top = jnp.where(ok[first], top, (height - fh) // 2)
  left = jnp.where(ok[first], left, (width - fw) // 2)
  return jnp.stack([top, left, h, w]).astype(jnp.float32)


def resized_crop(image: jax.Array, box: jax.Array) -> jax.Array:
  """The window ``box`` of ``image`` resized to the image's own size (bilinear, antialiased)."""
  height, width, c = image.shape
  top, left, h, w = box[0], box[1], box[2], box[3]
  scale = jnp.stack([height / h, width / w])
  return jax.image.scale_and_translate(
      image, (height, width, c), (0, 1), scale, -jnp.stack([top, left]) * scale,
      method="linear", antialias=True)


# ------------------------------------------------------------------ a view


def moco_view(key: jax.Array, image: jax.Array, spec: ViewSpec) -> jax.Array:
  """One augmented view of one ``[H, W, C]`` image in [0, 1] (still in [0, 1])."""
  kcrop, kj, kjp, kg, kb, kbp, kf = jax.random.split(key, 7)
  image = resized_crop(image, crop_box(kcrop, image.shape[0], image.shape[1], spec.crop_scale))
  image = jnp.clip(image, 0.0, 1.0)  # Bilinear antialiasing can overshoot a little.
  if spec.jitter_prob > 0 and max(spec.jitter) > 0:
    image = jnp.where(jax.random.bernoulli(kjp, spec.jitter_prob),
                      color_jitter(kj, image, spec.jitter), image)
  if spec.gray_prob > 0:
    image = jnp.where(jax.random.bernoulli(kg, spec.gray_prob),
                      jnp.broadcast_to(gray(image), image.shape), image)
  if spec.blur_prob > 0:
    image = jnp.where(jax.random.bernoulli(kbp, spec.blur_prob), gaussian_blur(kb, image), image)
  if spec.flip:
    image = jnp.where(jax.random.bernoulli(kf, 0.5), image[:, ::-1], image)
  return image


def moco_views(rng: jax.Array, images: jax.Array, *, spec: ViewSpec, mean, std,
               index_offset=0) -> jax.Array:
  """A batch of views, normalised: ``uint8[B, H, W, C]`` -> ``f32[B, H, W, C]``.

  Args:
    rng: the view's key for this step; example ``j`` of the global batch
      draws from ``fold_in(rng, j)``.
    images: this device's rows of the global batch, unaugmented.
    spec: the augmentation settings.
    mean: per-channel mean on the 0..1 scale.
    std: per-channel std.
    index_offset: global index of ``images[0]``.
  """
  keys = _augment.example_keys(rng, images.shape[0], index_offset)
  x = images.astype(jnp.float32) / 255.0
  x = jax.vmap(lambda k, im: moco_view(k, im, spec))(keys, x)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
