"""tfds: ``tfds.data_source`` on array_record data, ``tfds.load`` if TF exists.

tensorflow_datasets is imported only when this loader runs, so importing the
input pipeline stays cheap for the other sources.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from cmim_jax.data import records as _records


class TfdsRecords:
  """A tfds ``data_source`` split, read and decoded a batch at a time."""

  def __init__(self, data_source, num_threads: int):
    self._ds = data_source
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads)
                  if num_threads > 1 else None)
    self.image_shape = None  # Unknown until read; may vary (ImageNet).

  def __len__(self) -> int:
    return len(self._ds)

  def read(self, idx: np.ndarray):
    keys = [int(i) for i in idx]
    if self._pool is None:
      rows = [self._ds[k] for k in keys]
    else:
      # Decoding (PIL) releases the GIL, so threads overlap it.
      rows = list(self._pool.map(self._ds.__getitem__, keys))
    labels = np.array([r['label'] for r in rows], np.int32)
    return _records.stack_if_same_shape(
        [np.asarray(r['image']) for r in rows], labels)


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def open_builder(name, data_dir):
  """``(builder, where, data_dir)`` of tfds dataset ``name``; never downloads.

  Raises:
    DataNotFoundError: tfds has no such dataset.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise _records.DataNotFoundError(
        f'tfds has no dataset named {name!r}.') from None
  return builder, f'tfds {name!r} in {builder.data_dir}', data_dir


def check_split(builder, where: str, split: str) -> None:
  """Says why ``split`` of ``builder`` could not be opened, when the reason
  is that the data is absent or has no such split."""
  if not builder.is_prepared():
    # tfds's own error here talks about file formats; the data is absent.
    raise _records.DataNotFoundError(f'{where} is not prepared.')
  known = list(builder.info.splits)
  if split not in known:
    raise ValueError(f'{where} has no split {split!r}; it has {known}.')


def load(name, data_dir, split_names, *, num_threads, **_):
  """Loads ``split_names`` of tfds dataset ``name``; never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_dir and os.path.isfile(os.path.expanduser(data_dir)):
    raise _records.DataNotFoundError(
        f'data.data_dir={data_dir!r} is a file, not a tfds data directory.')
  builder, where, data_dir = open_builder(name, data_dir)
  features = builder.info.features
  label = features['label'] if 'label' in features else None
  class_names = tuple(label.names) if label is not None else ()
  splits = {}
  for split in split_names:
    try:
      # Data must be prepared offline (download=False).
      ds = tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
      splits[split] = TfdsRecords(ds, num_threads)
      continue
    except Exception as e:  # pylint: disable=broad-except
      error = e
    check_split(builder, where, split)
    if not _tensorflow_available():
      raise _records.DataNotFoundError(
          f'{where} is prepared as {builder.info.file_format}, which needs '
          f'TensorFlow; install tensorflow, or prepare it again with '
          f'--file_format=array_record ({error}).')
    # TensorFlow path: only for datasets that fit in memory at one size.
    arrays = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir,
                                     batch_size=-1, download=False))
    splits[split] = _records.ArrayRecords(
        np.asarray(arrays['image'], np.uint8),
        np.asarray(arrays['label'], np.int32))
  return _records.SourceData('tfds', where, splits, len(class_names),
                             class_names)
