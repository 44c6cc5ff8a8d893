"""Streaming input: batches built in Grain worker processes from streamed
splits (image folders, ArrayRecord shards, tfds array_record data).

The splits (``data/stream_sources.py``) are listings or record files, not
decoded images; each example is decoded and cropped by ``data/decode.py``
in the worker that builds its batch. Host memory is the listings plus the
batches in flight, however large the dataset is and whatever the image
sizes.

Order and randomness are those of the in-memory ``TrainData``: epoch ``e`` is
``default_rng([seed, 0, e]).permutation(N)``, step ``s`` takes rows
``[k * G, (k + 1) * G)`` of it, process ``i`` of ``P`` the ``i``-th of ``P``
slices. Example ``r`` of the split crops with ``default_rng([seed, 2, e,
r])``. A batch is therefore a pure function of ``(seed, step)``: the same
for any number of workers, processes or devices, and ``iterator(start)``
resumes a run exactly (the iterator's whole state is the next step, which
the checkpoint already holds). Training batches carry each example's row
of the split as ``'index'`` (for memory banks), as the in-memory batches do.

Workers: ``data.workers`` Grain worker processes (``MapDataset.map`` then
``mp_prefetch``), each building whole process-local batches; Grain hands
batch ``k`` to worker ``k mod W`` and yields them in step order, so ``W``
does not change what comes out. ``workers=0`` builds batches in the main
process (with ``data.prefetch`` background thread). Close an iterator
(``it.close()``) when done with it early; one that is dropped or still open
at exit is closed then, which releases the workers' shared memory.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import itertools
import logging
import os
import weakref

import numpy as np

from cmim_jax.data import iterators as _iterators
# Also the names convert.py and the tests use: one import for streaming.
from cmim_jax.data.decode import CorruptImageError, decode_crop  # noqa: F401
from cmim_jax.data.stream_sources import (  # noqa: F401
    SHARDS_META, FolderSplit, Selection, list_split, open_splits, pack_record,
    read_shards_meta, unpack_record)

ON_CORRUPT = ('error', 'skip')
PIPELINES = ('auto', 'memory', 'stream')
# Substitutes tried for one corrupt file under on_corrupt='skip' before the
# run stops: more than this in a row means the data, not a file, is broken.
MAX_SKIPS = 16


@dataclasses.dataclass
class Builder:
  """Builds process-local batches; pickled to every Grain worker."""
  records: object
  size: int
  crop_fraction: float
  random: bool
  on_corrupt: str
  seed: int

  def example(self, row: int, epoch: int, out=None):
    """``(image, label, row read, skipped)`` of row ``row``; under 'skip',
    corrupt rows give way to the next ones (the row read says which). The
    image is written into ``out`` (uint8[size, size, 3]) if given."""
    n = len(self.records)
    rng = (np.random.default_rng([self.seed, 2, epoch, row])
           if self.random else None)
    skipped = 0
    for k in range(MAX_SKIPS + 1):
      read = (row + k) % n
      data, label, where = None, None, f'row {read}'
      try:
        data, label, where = self.records.fetch(read)
        image = decode_crop(data, where, size=self.size, rng=rng,
                            crop_fraction=self.crop_fraction, out=out)
        return image, label, read, skipped
      except CorruptImageError:
        if self.on_corrupt != 'skip':
          raise
        logging.warning('Skipped corrupt image %s.', where)
        skipped += 1
    raise CorruptImageError(
        f'{MAX_SKIPS + 1} images in a row from row {row} are corrupt '
        f'(last: {where}); the data is broken, not one file.')

  def batch(self, rows, epoch: int, valid=None):
    """Images, labels, rows read (``'index'``) and skip counts of ``rows``
    (those with ``valid`` False left as zeros)."""
    b = len(rows)
    out = {'image': np.zeros((b, self.size, self.size, 3), np.uint8),
           'label': np.zeros(b, np.int32), 'index': np.zeros(b, np.int32),
           'skipped': np.zeros(b, np.int32)}
    for j, row in enumerate(rows):
      if valid is None or valid[j]:
        # The crop is written straight into its row of the batch.
        (_, out['label'][j], out['index'][j],
         out['skipped'][j]) = self.example(int(row), epoch,
                                           out=out['image'][j])
    return out


def _grain_stream(fn, start: int, stop: int | None, workers: int,
                  prefetch: int):
  """``fn(k)`` for ``k = start, start + 1, ...``, built by ``workers``."""
  if workers <= 0:
    ks = itertools.count(start) if stop is None else range(start, stop)
    return _iterators.prefetch(map(fn, ks), prefetch)
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    # Grain reads its absl flags in the workers; outside an absl app (a
    # notebook, pytest) they would be unparsed. Their defaults are wanted.
    flags.FLAGS(['cmim_jax'], known_only=True)
  atexit.unregister(_flush_grain_unlinks)  # Keeps one registration.
  atexit.register(_flush_grain_unlinks)
  ds = grain.MapDataset.range(start, stop if stop is not None else 2**62)
  ds = ds.map(fn).to_iter_dataset()
  return iter(ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=max(1, prefetch))))


def _plain(value):
  """A plain numpy copy of an ndarray subclass (Grain's shared-memory
  arrays); anything else as it is."""
  if isinstance(value, np.ndarray) and value.__class__ is not np.ndarray:
    return np.array(value)
  return value


def _flush_grain_unlinks() -> None:
  """Waits for Grain's background thread that unlinks the shared memory of
  freed arrays: an unlink still queued at exit is reported as a leak."""
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
    pool = shared_memory_array.SharedMemoryArray._del_thread_pool  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # Another Grain: nothing to wait for.
    return
  if pool is not None:
    pool.apply(int)  # One thread, first in first out: earlier unlinks done.


def _close(it) -> None:
  if hasattr(it, 'close'):
    it.close()


class _Counted:
  """Moves the 'skipped' field of each batch to a counter; closes the
  stream (its workers and their shared memory) when closed, dropped, or
  still open at interpreter exit."""

  def __init__(self, it, owner, grain: bool):
    self._it, self._owner, self._grain = it, owner, grain
    # A finalizer, not __del__: it also runs at exit, before the
    # multiprocessing resource tracker reports the shared memory as leaked.
    self._finalizer = weakref.finalize(self, _close, it)

  def __iter__(self):
    return self

  def __next__(self):
    try:
      raw = next(self._it)
    except StopIteration:
      if not self._grain:
        raise
      # An exhausted Grain stream keeps the last batch of each worker in a
      # reference cycle (its worker thread's frame), so its shared memory
      # is unlinked only by the garbage collector, or reported leaked at
      # exit: collect now, once per finished pass.
      self._release()
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not self._grain:
        raise
      # A failed stream (a corrupt image in a worker) is released here too,
      # before the error leaves: else its multiprocessing locks are finalized
      # at some later moment (when Grain's threads let go, then a GC). Their
      # finalizers import (multiprocessing.resource_tracker), and run inside
      # another library's import-time patch of builtins.__import__ (tfds's
      # etils lazy_imports) that import fails: pytest then fails whatever
      # test is running. The traceback's frames hold the stream, so they go
      # first (the message names the image; Grain hides its frames anyway).
      error, seen = e, set()
      while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
      del error
      self._release()
      raise e  # The same error, its cause and context as they were.
    # Grain's arrays live in shared memory, unlinked when the array is
    # freed: one still referenced at exit (the last batch, a jax array
    # aliasing it) is reported leaked. Own copies free them right away.
    batch = {k: _plain(v) for k, v in raw.items()}
    del raw
    n = int(batch.pop('skipped').sum())
    if n:
      self._owner.corrupt_skipped += n
      logging.warning('Skipped %d corrupt images (%d so far).', n,
                      self._owner.corrupt_skipped)
    return batch

  def close(self):
    self._finalizer()

  def _release(self):
    self.close()
    gc.collect()
    _flush_grain_unlinks()


class _Streamed:
  """What the streamed train and eval data share: batches from ``_build``,
  one at a time (``get_batch``) or from workers (``iterator``)."""

  def get_batch(self, k: int) -> dict:
    if k < 0:
      raise ValueError(f'step must be >= 0, got {k}.')
    batch = self._build(int(k))
    self.corrupt_skipped += int(batch.pop('skipped').sum())
    return batch

  def _stream(self, start: int, stop: int | None):
    return _Counted(_grain_stream(self._build, start, stop, self._workers,
                                  self._prefetch), self,
                    grain=self._workers > 0)


class StreamTrainData(_Streamed, _iterators.TrainData):
  """``TrainData``'s order over undecoded records, built in worker processes.

  Attributes:
    corrupt_skipped: corrupt images skipped so far (``on_corrupt='skip'``)
      by the iterators of this object.
  """

  def __init__(self, records, *, global_batch_size, seed, process_index,
               process_count, builder: Builder, workers: int, prefetch: int,
               split: str = 'train'):
    super().__init__(records, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count,
                     transform=None, prefetch=prefetch, split=split)
    self._builder, self._workers = builder, workers
    self.corrupt_skipped = 0

  def __getstate__(self):
    # Workers rebuild the epoch permutation; no need to pickle a cached one.
    return {**self.__dict__, '_perm_cache': (None, None)}

  def _build(self, step: int) -> dict:
    return self._builder.batch(self.indices(step),
                               step // self.steps_per_epoch)

  def iterator(self, start_step: int = 0, num_steps: int | None = None):
    """Batches of steps ``start_step, ...`` (``num_steps`` of them, or
    endless); ``close()`` it when stopping early."""
    stop = None if num_steps is None else start_step + num_steps
    return self._stream(start_step, stop)


class StreamEvalData(_Streamed, _iterators.EvalData):
  """``EvalData`` (in order, padded, masked) over undecoded records."""

  def __init__(self, records, *, global_batch_size, process_index,
               process_count, builder: Builder, workers: int, prefetch: int):
    super().__init__(records, global_batch_size=global_batch_size,
                     process_index=process_index, process_count=process_count,
                     transform=None,
                     image_shape=(builder.size, builder.size, 3),
                     prefetch=prefetch)
    self._builder, self._workers = builder, workers
    self.corrupt_skipped = 0

  def _build(self, k: int) -> dict:
    b = self.local_batch_size
    rows = k * self.global_batch_size + self._process_index * b + np.arange(b)
    valid = rows < self.num_examples
    batch = self._builder.batch(rows, 0, valid)
    del batch['index']  # As in-memory evaluation: no memory bank reads it.
    batch['mask'] = valid.astype(np.float32)
    return batch

  def iterator(self):
    """One pass over the split, ``num_batches`` batches."""
    return self._stream(0, self.num_batches)


def default_workers() -> int:
  return min(16, os.cpu_count() or 1)
