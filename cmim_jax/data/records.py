"""Record types: random-access splits, what a loader returns, dataset facts.

A split is any object with ``len(records)``, ``records.image_shape`` ((H, W,
C), or None when images differ in size) and ``records.read(indices) ->
(images, labels)``; images come back as one uint8 array when they share a
shape, else as a list. Small datasets are held in memory (``ArrayRecords``);
large ones are read lazily by their loader (``loaders.tfds.TfdsRecords``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


class DataNotFoundError(FileNotFoundError):
  """A source found no data where it looked (the message says where)."""


class ArrayRecords:
  """A split held in memory: uint8 images [N, H, W, C] and int32 labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(
          f'Images must be uint8[N, H, W, C], got {images.dtype}'
          f'{list(images.shape)}.')
    if len(images) != len(labels):
      raise ValueError(
          f'{len(images)} images but {len(labels)} labels.')
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def read(self, idx: np.ndarray):
    return self.images[idx], self.labels[idx]

  def slice(self, start: int, stop: int) -> ArrayRecords:
    return ArrayRecords(self.images[start:stop], self.labels[start:stop])


def stack_if_same_shape(images: list, labels: np.ndarray):
  """``(images, labels)`` with images stacked into one array when possible."""
  if images and all(im.shape == images[0].shape for im in images):
    return np.stack(images), labels
  return images, labels


class _SliceRecords:

  def __init__(self, records, start: int, stop: int):
    self._records, self._start, self._len = records, start, stop - start
    self.image_shape = records.image_shape

  def __len__(self):
    return self._len

  def read(self, idx):
    return self._records.read(np.asarray(idx) + self._start)


class _ConcatRecords:
  """Rows of several records one after the other (``'train+test'``)."""

  def __init__(self, parts):
    self._parts = parts
    self._ends = np.cumsum([len(p) for p in parts])
    shapes = {p.image_shape for p in parts}
    self.image_shape = shapes.pop() if len(shapes) == 1 else None

  def __len__(self):
    return int(self._ends[-1])

  def read(self, idx):
    idx = np.asarray(idx)
    which = np.searchsorted(self._ends, idx, side='right')
    images, labels = [None] * len(idx), np.zeros(len(idx), np.int32)
    for p in np.unique(which):
      sel = np.flatnonzero(which == p)
      start = self._ends[p] - len(self._parts[p])
      ims, labels[sel] = self._parts[p].read(idx[sel] - start)
      for j, im in zip(sel, ims):
        images[j] = im
    return stack_if_same_shape(images, labels)


def select(records_by_split: dict, pieces: Sequence[tuple[str, int, int]]):
  """Records for ``(split, start, stop)`` pieces from ``resolve_split``."""
  parts = []
  for split, start, stop in pieces:
    r = records_by_split[split]
    parts.append(r.slice(start, stop) if isinstance(r, ArrayRecords)
                 else _SliceRecords(r, start, stop))
  if len(parts) == 1:
    return parts[0]
  if all(isinstance(p, ArrayRecords) for p in parts):
    shapes = {p.image_shape for p in parts}
    if len(shapes) > 1:
      raise ValueError(f'Splits joined with + have image shapes {shapes}.')
    return ArrayRecords(np.concatenate([p.images for p in parts]),
                        np.concatenate([p.labels for p in parts]))
  return _ConcatRecords(parts)


@dataclasses.dataclass
class SourceData:
  """What a loader found.

  Attributes:
    source: the loader that found it ('tfds', 'folder', ...).
    location: where, for logs and errors.
    splits: split name -> records, for the requested split names.
    num_classes: number of classes.
    class_names: class names in label order.
  """
  source: str
  location: str
  splits: dict
  num_classes: int
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about the datasets; hashable, so it can be a jit static.

  Attributes:
    name: dataset name.
    source: the source that provided the data.
    num_classes: number of classes.
    image_shape: (H, W, C) of the batches the iterators yield.
    num_train: examples in the training split.
    num_eval: examples in the evaluation split (0 if none).
    mean: per-channel mean on the 0..1 scale.
    std: per-channel std on the 0..1 scale.
    augment: the resolved augmentation mode ('device', 'host', 'none').
    crop_padding: padding of the pad-crop (0: no pad-crop).
    pad_mode: 'constant' (zeros) or 'reflect': how the pad-crop pads.
    class_names: class names in label order.
  """
  name: str
  source: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str
  crop_padding: int
  pad_mode: str = 'constant'
  class_names: tuple[str, ...] = dataclasses.field(
      default=(), compare=False, repr=False)
