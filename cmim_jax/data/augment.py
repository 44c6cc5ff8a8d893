"""Augmentation and normalisation, on the host (numpy/PIL) and on device (jax).

Two families (docs/METHODS.md, section 7, and the papers' released code):

* ``pad_crop``: CIFAR style. Pad ``pad`` pixels on each side, with zeros (0
  is black in uint8, as torchvision's ``RandomCrop(32, padding=4)`` pads the
  PIL image before ``Normalize``) or, for CIFAR-100 (``info.pad_mode``), by
  reflection as CMIM's released code (``Pad(4, padding_mode='reflect')``);
  take a random ``H x W`` window, flip horizontally with probability 1/2. The host version (numpy) and the device version
  (``jax.random``) draw the same distribution.
* ``resized_crop``: ImageNet style, host only (images differ in size).
  Training: random crop of area fraction U(0.08, 1) of the image and aspect
  ratio log-uniform in (3/4, 4/3), resized to ``size``, then a flip.
  Evaluation: the central ``crop_fraction`` (224/256) of the shorter side,
  resized to ``size`` -- geometrically the same as "resize the shorter side
  to 256, crop the central 224".

Normalisation ``(x / 255 - mean) / std`` always happens on device, in
``preprocess_on_device``, with one mean/std per dataset for train and eval.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

AUGMENT_MODES = ('auto', 'device', 'host', 'none')


# ----------------------------------------------------------------- host side


def pad_crop_flip_params(rng: np.random.Generator, n: int, pad: int):
  """Draws ``n`` crop offsets in ``[0, 2 * pad]`` and flip flags."""
  offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
  flips = rng.random(n) < 0.5
  return offsets, flips


def pad_crop_flip_np(images: np.ndarray, offsets: np.ndarray,
                     flips: np.ndarray, pad: int,
                     mode: str = 'constant') -> np.ndarray:
  """Applies pad-crop-flip to a uint8 batch with the given parameters.

  Args:
    images: uint8[B, H, W, C].
    offsets: int[B, 2], (row, column) of each window in the padded image.
    flips: bool[B], flip horizontally after cropping.
    pad: padding on each side.
    mode: 'constant' (zeros) or 'reflect' (``np.pad``'s modes).

  Returns:
    uint8[B, H, W, C].
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
  rows = offsets[:, 0, None] + np.arange(h)  # [B, H]
  # Flipping is reading the columns of the window backwards.
  cols = np.where(flips[:, None], np.arange(w - 1, -1, -1), np.arange(w))
  cols = offsets[:, 1, None] + cols  # [B, W]
  return padded[np.arange(b)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


def sample_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """Samples a random-resized-crop window ``(top, left, h, w)``.

  Area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in
  ``ratio``; after ``attempts`` windows that do not fit, the largest central
  window whose ratio is clipped to ``ratio``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _resize_box(image: np.ndarray, box, size: int) -> np.ndarray:
  top, left, h, w = box
  pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
  # Pillow's resize with `box` crops and resizes in one pass, antialiased.
  out = np.asarray(pil.resize((size, size), Image.BILINEAR,
                              box=(left, top, left + w, top + h)))
  return out.reshape(size, size, image.shape[-1])


def random_resized_crop_flip_np(image: np.ndarray, rng: np.random.Generator,
                                size: int) -> np.ndarray:
  """ImageNet training crop of one uint8[H, W, C] image -> uint8[size, size, C]."""
  box = sample_resized_crop_box(rng, image.shape[0], image.shape[1])
  out = _resize_box(image, box, size)
  return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop_resize_np(image: np.ndarray, size: int,
                          crop_fraction: float = 0.875) -> np.ndarray:
  """ImageNet evaluation crop of one uint8[H, W, C] image -> uint8[size, size, C]."""
  height, width = image.shape[:2]
  side = int(round(min(height, width) * crop_fraction))
  box = ((height - side) // 2, (width - side) // 2, side, side)
  return _resize_box(image, box, size)


# --------------------------------------------------------------- device side


def example_keys(rng: jax.Array, n: int, index_offset=0) -> jax.Array:
  """The augmentation keys of ``n`` consecutive examples of a global batch.

  Example ``j`` of the global batch draws from ``fold_in(rng, j)``. A device
  holding rows ``index_offset .. index_offset + n`` of it therefore draws
  what a single device holding the whole batch would, whatever the number of
  devices.

  Args:
    rng: the step's PRNG key.
    n: number of examples.
    index_offset: global index of the first example (an int, or a traced
      scalar such as ``axis_index * n`` under ``shard_map``/``pmap``).

  Returns:
    ``n`` keys, one per example.
  """
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(
      index_offset + jnp.arange(n))


def pad_crop_flip(keys: jax.Array, images: jax.Array, pad: int,
                  mode: str = 'constant') -> jax.Array:
  """Random pad-crop and horizontal flip of a batch, in jax.

  Args:
    keys: one PRNG key per image (``example_keys``); image ``i``'s window
      and flip are a function of ``keys[i]`` alone.
    images: [B, H, W, C], any dtype (uint8 keeps the gather cheap).
    pad: padding on each side; offsets are uniform in ``[0, 2 * pad]``.
    mode: 'constant' (zeros) or 'reflect' (``jnp.pad``'s modes).

  Returns:
    Array of the shape and dtype of ``images``.
  """
  b, h, w, c = images.shape
  if keys.shape[:1] != (b,):
    raise ValueError(f'pad_crop_flip needs one key per image: {b} images, '
                     f'keys of shape {keys.shape}; use example_keys.')

  def one(key, image):
    crop_key, flip_key = jax.random.split(key)
    # Shapes (1, 2) and (1,), as a batch of one: keeps the draws those of the
    # trainer's earlier per-example code, so runs stay reproducible.
    offset = jax.random.randint(crop_key, (1, 2), 0, 2 * pad + 1)[0]
    flip = jax.random.bernoulli(flip_key, 0.5, (1,))[0]
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    crop = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(keys, images)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """``(images / 255 - mean) / std`` in float32, per channel."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  # One multiply-add per pixel instead of a divide, a subtract and a divide.
  return images.astype(jnp.float32) * (1.0 / (255.0 * std)) - mean / std


def resolve_augment(augment: str | None, info) -> str:
  """Maps ``'auto'``/``None``/``''`` to the dataset's default mode."""
  if augment in (None, '', 'auto'):
    return info.augment
  if augment not in AUGMENT_MODES:
    raise ValueError(
        f'augment={augment!r} is not one of {AUGMENT_MODES}.')
  return augment


def preprocess_on_device(rng: jax.Array | None, images: jax.Array, *, info,
                         train: bool, augment: str | None,
                         index_offset=0) -> jax.Array:
  """Turns uint8 batches from the iterators into normalised float32 images.

  Jittable; ``info``, ``train`` and ``augment`` are static Python values.
  With ``train`` and ``augment == 'device'`` it first applies the random
  pad-crop-flip (pad ``info.crop_padding``), example ``j`` of the global
  batch drawing from ``fold_in(rng, j)`` (``example_keys``), so the result
  does not depend on how the batch is split over devices. Otherwise the
  images are only normalised (host augmentation, if any, already happened in
  the iterator). The same ``info.mean``/``info.std`` are used for train and
  eval.

  Args:
    rng: PRNG key for the augmentation; fold in the step so that a resumed
      run draws the same crops. May be None when no device augmentation
      applies.
    images: uint8[B, H, W, C] as yielded by the iterators: the global batch,
      or one device's consecutive rows of it.
    info: the ``DatasetInfo`` from ``get_datasets``.
    train: whether this is a training batch.
    augment: 'device', 'host', 'none', or 'auto' (= ``info.augment``).
    index_offset: global batch index of ``images[0]``; on device ``d`` of a
      ``shard_map``/``pmap`` over the batch, ``axis_index * B``.

  Returns:
    float32[B, H, W, C].
  """
  if images.ndim != 4:
    raise ValueError(
        f'preprocess_on_device expects images [B, H, W, C], got shape '
        f'{images.shape}.')
  if tuple(images.shape[1:]) != tuple(info.image_shape):
    raise ValueError(
        f'Images of shape {tuple(images.shape[1:])} do not match '
        f'info.image_shape {tuple(info.image_shape)}.')
  mode = resolve_augment(augment, info)
  if train and mode == 'device':
    if info.crop_padding <= 0:
      raise ValueError(
          f"augment='device' needs a fixed-size dataset with a crop padding; "
          f'{info.name} has none (use augment=\'host\').')
    if rng is None:
      raise ValueError("augment='device' with train=True needs an rng key.")
    keys = example_keys(rng, images.shape[0], index_offset)
    images = pad_crop_flip(keys, images, info.crop_padding, info.pad_mode)
  return normalize(images, info.mean, info.std)
