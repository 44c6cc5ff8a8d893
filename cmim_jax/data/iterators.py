"""Process-local batch iterators: step-indexed training, exact-once evaluation.

Training batches are a pure function of the step. Epoch ``e`` is the
permutation ``default_rng([seed, 0, e]).permutation(N)``; step ``s`` takes
rows ``[k * G, (k + 1) * G)`` of it (``e, k = divmod(s, steps_per_epoch)``,
``G`` the global batch size, the last ``N mod G`` rows of each epoch unused)
and process ``i`` of ``P`` keeps the ``i``-th of ``P`` equal slices. So the
processes read disjoint examples, their concatenated batches are exactly the
single-process batch, and ``iterator(start_step)`` resumes anywhere.
Host augmentation draws from ``default_rng([seed, 1, step])`` per global
batch (per example for ImageNet crops), so it too does not depend on the
process count or on where iteration started.

Evaluation walks the split in order, ``G_eval`` at a time, padding the last
batch with zero images and ``mask == 0``; every process yields
``ceil(N / G_eval)`` batches.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
from collections.abc import Iterator

import numpy as np

from cmim_jax.data import augment as aug


class HostTransform:
  """Raw images from records -> fixed-size uint8 batches, on the host.

  Args:
    crop: 'pad_crop' (fixed-size images) or 'resized_crop' (ImageNet).
    train: training (random) or evaluation (deterministic) transform.
    augment: resolved mode; random host augmentation only for 'host'.
    image_size: output side for 'resized_crop'.
    pad: padding of the pad-crop.
    pad_mode: 'constant' or 'reflect'.
    crop_fraction: central crop fraction for 'resized_crop' evaluation.
    num_threads: threads for per-image (PIL) work.
  """

  def __init__(self, *, crop: str, train: bool, augment: str, image_size: int,
               pad: int, crop_fraction: float, num_threads: int,
               pad_mode: str = 'constant'):
    self.pad_mode = pad_mode
    self.crop, self.train, self.augment = crop, train, augment
    self.image_size, self.pad, self.crop_fraction = (image_size, pad,
                                                     crop_fraction)
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads)
                  if crop == 'resized_crop' and num_threads > 1 else None)

  def __call__(self, images, *, seed: int, step: int, slots: np.ndarray,
               global_batch: int) -> np.ndarray:
    """Transforms the images at positions ``slots`` of a global batch."""
    random = self.train and self.augment == 'host'
    if self.crop == 'pad_crop':
      if isinstance(images, list):
        shapes = sorted({im.shape for im in images})
        raise ValueError(f'Images of one batch differ in shape {shapes}; '
                         f'this dataset needs one image size.')
      if not random:
        return images
      offsets, flips = aug.pad_crop_flip_params(
          np.random.default_rng([seed, 1, step]), global_batch, self.pad)
      return aug.pad_crop_flip_np(images, offsets[slots], flips[slots],
                                  self.pad, self.pad_mode)

    def one(args):
      image, slot = args
      if random:
        # One generator per example: the crop loop draws a variable number
        # of values, and this keeps each example's crop independent of the
        # others and of the process count.
        rng = np.random.default_rng([seed, 1, step, int(slot)])
        return aug.random_resized_crop_flip_np(image, rng, self.image_size)
      return aug.center_crop_resize_np(image, self.image_size,
                                       self.crop_fraction)

    work = list(zip(images, slots))
    out = list(self._pool.map(one, work)) if self._pool else list(
        map(one, work))
    return np.stack(out)


class TrainData:
  """The training split as an endless, step-indexed stream of batches.

  Attributes:
    num_examples: examples in the split (all processes).
    global_batch_size: examples per step over all processes.
    local_batch_size: examples per step on this process.
    steps_per_epoch: ``num_examples // global_batch_size``.
  """

  def __init__(self, records, *, global_batch_size: int, seed: int,
               process_index: int, process_count: int, transform: HostTransform,
               prefetch: int = 0, split: str = 'train'):
    self._records, self._transform = records, transform
    self.num_examples = len(records)
    if self.num_examples < global_batch_size:
      raise ValueError(
          f'Training split {split!r} has {self.num_examples} examples, fewer '
          f'than one global batch of {global_batch_size}: use a larger split '
          f'or a smaller batch size.')
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.steps_per_epoch = self.num_examples // global_batch_size
    self._seed, self._process_index = seed, process_index
    self._prefetch = prefetch
    self._perm_cache = (None, None)

  def _permutation(self, epoch: int) -> np.ndarray:
    # One attribute holding (epoch, perm): several iterator threads may call
    # this at once, and a single assignment is atomic.
    cached_epoch, perm = self._perm_cache
    if cached_epoch != epoch:
      perm = np.random.default_rng([self._seed, 0, epoch]).permutation(
          self.num_examples)
      self._perm_cache = (epoch, perm)
    return perm

  def indices(self, step: int) -> np.ndarray:
    """Rows of the split that this process reads at ``step``."""
    epoch, k = divmod(int(step), self.steps_per_epoch)
    first = k * self.global_batch_size + (
        self._process_index * self.local_batch_size)
    return self._permutation(epoch)[first:first + self.local_batch_size]

  def get_batch(self, step: int) -> dict:
    """The process-local batch of ``step``: uint8 images, int32 labels and
    each example's row in the split (``'index'``, for memory banks)."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}.')
    rows = self.indices(step)
    images, labels = self._records.read(rows)
    slots = self._process_index * self.local_batch_size + np.arange(
        self.local_batch_size)
    images = self._transform(images, seed=self._seed, step=int(step),
                             slots=slots,
                             global_batch=self.global_batch_size)
    return {'image': images, 'label': labels,
            'index': np.asarray(rows, np.int32)}

  def iterator(self, start_step: int = 0,
               num_steps: int | None = None) -> Iterator[dict]:
    """Batches of steps ``start_step, start_step + 1, ...``.

    Args:
      start_step: the first step (to resume a run).
      num_steps: how many batches; None for an endless stream.
    """
    stop = None if num_steps is None else start_step + num_steps

    def gen():
      step = start_step
      while stop is None or step < stop:
        yield self.get_batch(step)
        step += 1

    return prefetch(gen(), self._prefetch)


class EvalData:
  """An evaluation split: every example exactly once, padded and masked.

  Attributes:
    num_examples: examples in the split (all processes).
    global_batch_size: examples per batch over all processes.
    local_batch_size: examples per batch on this process.
    num_batches: batches per pass, the same on every process.
  """

  def __init__(self, records, *, global_batch_size: int, process_index: int,
               process_count: int, transform: HostTransform,
               image_shape: tuple[int, int, int], prefetch: int = 0):
    self._records, self._transform = records, transform
    self.num_examples = len(records)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.num_batches = math.ceil(self.num_examples / global_batch_size)
    self._process_index, self._image_shape = process_index, image_shape
    self._prefetch = prefetch

  def get_batch(self, k: int) -> dict:
    """Batch ``k``: images, labels and ``mask`` (1 real, 0 padding)."""
    b = self.local_batch_size
    slots = self._process_index * b + np.arange(b)
    rows = k * self.global_batch_size + slots
    valid = rows < self.num_examples
    images = np.zeros((b,) + tuple(self._image_shape), np.uint8)
    labels = np.zeros(b, np.int32)
    if valid.any():
      raw, labels[valid] = self._records.read(rows[valid])
      images[valid] = self._transform(raw, seed=0, step=k, slots=slots[valid],
                                      global_batch=self.global_batch_size)
    return {'image': images, 'label': labels,
            'mask': valid.astype(np.float32)}

  def iterator(self) -> Iterator[dict]:
    """One pass over the split, ``num_batches`` batches."""
    return prefetch((self.get_batch(k) for k in range(self.num_batches)),
                    self._prefetch)


class _Prefetch:
  """Runs an iterator in a daemon thread, ``size`` items ahead.

  Errors in the producer are re-raised in the consumer. The thread stops
  when the consumer closes this iterator or drops it.
  """

  def __init__(self, iterator, size: int):
    self._queue = queue.Queue(size)
    self._stop = threading.Event()
    self._finished = False
    # The worker gets no reference to self, so dropping self closes it.
    self._thread = threading.Thread(
        target=self._work, args=(iterator, self._queue, self._stop),
        daemon=True)
    self._thread.start()

  @staticmethod
  def _work(iterator, q, stop):

    def put(item):
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    try:
      for item in iterator:
        if not put((True, item)):
          return
      put((False, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((False, e))

  def __iter__(self):
    return self

  def __next__(self):
    if self._finished:
      raise StopIteration
    ok, item = self._queue.get()
    if ok:
      return item
    self._finished = True
    self._stop.set()
    if item is None:
      raise StopIteration
    raise item

  def close(self):
    self._finished = True
    self._stop.set()

  def __del__(self):
    self._stop.set()


def prefetch(iterator, size: int):
  """``iterator`` run ``size`` items ahead in a background thread (0: as is)."""
  return _Prefetch(iterator, size) if size > 0 else iterator
