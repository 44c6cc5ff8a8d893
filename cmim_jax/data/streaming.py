"""Streaming input: image folders, ArrayRecord shards and tfds array_record
data, decoded and cropped in Grain worker processes.

Nothing is decoded up front: a split is a list of file names (a folder), a
set of ArrayRecord shards (``python -m cmim_jax.data.convert``), or a tfds
``data_source``. Host memory is the listing (a few dozen bytes per file,
held as one byte buffer) plus the batches in flight, however large the
dataset is and whatever the image sizes.

Order and randomness are those of the in-memory ``TrainData``: epoch ``e`` is
``default_rng([seed, 0, e]).permutation(N)``, step ``s`` takes rows
``[k * G, (k + 1) * G)`` of it, process ``i`` of ``P`` the ``i``-th of ``P``
slices. Example ``r`` of the split crops with ``default_rng([seed, 2, e,
r])``. A batch is therefore a pure function of ``(seed, step)``: the same
for any number of workers, processes or devices, and ``iterator(start)``
resumes a run exactly (the iterator's whole state is the next step, which
the checkpoint already holds).

Workers: ``data.workers`` Grain worker processes (``MapDataset.map`` then
``mp_prefetch``), each building whole process-local batches; Grain hands
batch ``k`` to worker ``k mod W`` and yields them in step order, so ``W``
does not change what comes out. ``workers=0`` builds batches in the main
process (with ``data.prefetch`` background thread).

The crop is ``augment.sample_resized_crop_box`` (the in-memory path's
random-resized crop, then a flip; evaluation: central ``crop_fraction``),
computed on the full-size image; a JPEG is decoded at the smallest
1/2, 1/4 or 1/8 scale that still leaves the crop at least the output size
(libjpeg's DCT scaling), which is where most of the speed comes from.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import struct
import zlib

import numpy as np
from PIL import Image

from cmim_jax.data import augment as _augment
from cmim_jax.data import iterators as _iterators
from cmim_jax.data import records as _records
from cmim_jax.data.loaders import folder as _folder

ON_CORRUPT = ('error', 'skip')
PIPELINES = ('auto', 'memory', 'stream')
# Substitutes tried for one corrupt file under on_corrupt='skip' before the
# run stops: more than this in a row means the data, not a file, is broken.
MAX_SKIPS = 16

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error,
                  Image.DecompressionBombError)


class CorruptImageError(ValueError):
  """An image could not be decoded (the message names it and the fix)."""


# ------------------------------------------------------------ record sources


class _Strings:
  """Many strings in one byte buffer: a list of 1M paths costs ~1M objects
  otherwise, and is copied to every worker."""

  def __init__(self, strings):
    encoded = [s.encode() for s in strings]
    self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
    self._buf = b''.join(encoded)

  def __len__(self):
    return len(self._ends)

  def __getitem__(self, i):
    start = self._ends[i - 1] if i else 0
    return self._buf[start:self._ends[i]].decode()


@dataclasses.dataclass
class FolderSplit:
  """Split ``root/<split>/<class>/*`` listed, not decoded.

  Row ``i`` is file ``folder_order(n)[i]`` of the (class, file) sorted
  listing, the in-memory folder loader's order, so split slices match.
  """
  root: str
  split: str
  class_names: tuple

  def __post_init__(self):
    split_dir = os.path.join(self.root, self.split)
    files, labels, class_of = [], [], {}
    for cls, paths in list_split(split_dir):
      class_of.setdefault(cls, len(class_of))
      files += paths
      labels += [cls] * len(paths)
    cid = {c: i for i, c in enumerate(self.class_names)}
    order = _folder.folder_order(len(files))
    self._files = _Strings([os.path.relpath(files[j], self.root)
                            for j in order])
    self._labels = np.array([cid[labels[j]] for j in order], np.int32)

  def __len__(self):
    return len(self._labels)

  def fetch_path(self, i: int):
    """``(path, label)`` of row ``i``."""
    return os.path.join(self.root, self._files[i]), int(self._labels[i])

  def fetch(self, i: int):
    """``(encoded bytes, label, path)`` of row ``i``."""
    path = os.path.join(self.root, self._files[i])
    try:
      with open(path, 'rb') as fh:
        data = fh.read()
    except OSError as e:
      raise CorruptImageError(f'Cannot read image {path}: {e}.') from None
    return data, int(self._labels[i]), path


def list_split(split_dir: str):
  """``[(class, [image paths])]`` of ``split_dir/<class>/*``, sorted.

  Files that are not images (by extension) are left out and logged; a class
  folder without images is an error (a silently missing class would shift
  every label after it).
  """
  if not os.path.isdir(split_dir):
    raise _records.DataNotFoundError(
        f'no split folder {split_dir} (expected data_dir/<split>/<class>/'
        f'*.jpg).')
  classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
  if not classes:
    raise ValueError(f'{split_dir} has no class folders; expected '
                     f'{split_dir}/<class>/*.jpg.')
  out, stray = [], []
  for cls in classes:
    paths = []
    for e in sorted(os.scandir(os.path.join(split_dir, cls)),
                    key=lambda e: e.name):
      if e.is_file() and e.name.lower().endswith(_folder.IMAGE_EXTENSIONS):
        paths.append(e.path)
      elif not e.name.startswith('.'):
        stray.append(e.path)
    if not paths:
      raise ValueError(
          f'Class folder {os.path.join(split_dir, cls)} holds no images '
          f'({", ".join(_folder.IMAGE_EXTENSIONS)}); add images or remove '
          f'the folder.')
    out.append((cls, paths))
  if stray:
    logging.warning(
        'Ignored %d files that are not %s images in %s, e.g. %s.', len(stray),
        '/'.join(_folder.IMAGE_EXTENSIONS), split_dir, stray[:3])
  return out


# Shard records: magic, row index, label, crc32 of the image bytes, length of
# the source path; then the path (for error messages) and the image bytes.
_MAGIC = b'CMJ1'
_HEADER = struct.Struct('<4sqiII')
SHARDS_META = 'cmim_jax_shards.json'


def pack_record(index: int, label: int, path: str, data: bytes) -> bytes:
  """One shard record (``convert`` writes them, ``ShardSplit`` reads them)."""
  p = path.encode()
  return _HEADER.pack(_MAGIC, index, label, zlib.crc32(data), len(p)) + p + data


def unpack_record(record: bytes, where: str):
  """``(index, label, path, image bytes)``; CorruptImageError if damaged."""
  try:
    magic, index, label, crc, plen = _HEADER.unpack_from(record)
  except struct.error:
    magic = None
  if magic != _MAGIC:
    raise CorruptImageError(
        f'{where} is not a cmim_jax shard record; rebuild the shards with '
        f'`python -m cmim_jax.data.convert`.')
  start = _HEADER.size + plen
  path, data = record[_HEADER.size:start].decode(), record[start:]
  if zlib.crc32(data) != crc:
    raise CorruptImageError(
        f'{where} (from {path}) fails its checksum: the shard is damaged. '
        f'Delete it and run `python -m cmim_jax.data.convert` again (it '
        f'rewrites missing shards only).')
  return index, label, path, data


def read_shards_meta(root: str) -> dict:
  path = os.path.join(root, SHARDS_META)
  if not os.path.isfile(path):
    raise _records.DataNotFoundError(
        f'no {SHARDS_META} in {root} (not a finished `python -m '
        f'cmim_jax.data.convert` output).')
  with open(path) as fh:
    return json.load(fh)


class ShardSplit:
  """One split of ``convert``'s ArrayRecord shards; row = stored index."""

  def __init__(self, root: str, split: str, meta: dict):
    if split not in meta['splits']:
      raise ValueError(f'Shards in {root} have no split {split!r}; they have '
                       f'{sorted(meta["splits"])}.')
    info = meta['splits'][split]
    self._paths = [os.path.join(root, split, s) for s in info['shards']]
    missing = [p for p in self._paths if not os.path.isfile(p)]
    if missing:
      raise ValueError(f'Shard files {missing[:3]} listed in {root}/'
                       f'{SHARDS_META} are missing; run convert again.')
    self._n = int(info['num_examples'])
    self._source = None  # Opened lazily: each worker opens its own readers.

  def __len__(self):
    return self._n

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def fetch(self, i: int):
    if self._source is None:
      from grain import sources  # pylint: disable=g-import-not-at-top
      self._source = sources.ArrayRecordDataSource(self._paths)
    where = f'record {i} of the shards {os.path.dirname(self._paths[0])}'
    try:
      record = self._source[i]
    except RuntimeError as e:  # Riegeli's own chunk hash failed.
      raise CorruptImageError(
          f'{where} cannot be read ({e}): the shard is damaged. Delete it '
          f'and run `python -m cmim_jax.data.convert` again (it rewrites '
          f'missing shards only).') from None
    index, label, path, data = unpack_record(record, where)
    if index != i:
      raise CorruptImageError(f'{where} holds row {index}: shards are out '
                              f'of order or mixed; convert again.')
    return data, label, path


class TfdsSplit:
  """A tfds array_record split, read through ``tfds.data_source``.

  tfds decodes the image itself (no reduced-size JPEG decoding), in the
  worker that reads it.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    self._args = (name, split, data_dir)
    self._n = len(self._open())
    self._source = None

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.data_source(self._args[0], split=self._args[1],
                            data_dir=self._args[2], download=False)

  def __len__(self):
    return self._n

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def fetch(self, i: int):
    if self._source is None:
      self._source = self._open()
    where = f'tfds {self._args[0]} {self._args[1]}[{i}]'
    try:
      row = self._source[int(i)]
    except _DECODE_ERRORS as e:
      raise CorruptImageError(f'Cannot decode {where}: {e}.') from None
    return np.asarray(row['image']), int(row['label']), where


class Selection:
  """Rows of one or more splits one after the other (split slicing, '+')."""

  def __init__(self, pieces):
    self._parts = [(src, start) for src, start, _ in pieces]
    self._ends = np.cumsum([stop - start for _, start, stop in pieces])

  def __len__(self):
    return int(self._ends[-1]) if len(self._ends) else 0

  def fetch(self, i: int):
    p = int(np.searchsorted(self._ends, i, side='right'))
    src, start = self._parts[p]
    return src.fetch(int(i - (self._ends[p - 1] if p else 0) + start))


# ------------------------------------------------------------- decode + crop


def decode_crop(data, where: str, *, size: int, rng=None,
                crop_fraction: float = 0.875, reduced: bool = True):
  """Encoded image (or uint8 array) -> uint8[size, size, 3].

  Args:
    data: encoded bytes, or an already decoded uint8[H, W, C] array.
    where: the image's path, for errors.
    size: output side.
    rng: a numpy Generator for the training crop and flip; None for the
      evaluation crop (central ``crop_fraction`` of the shorter side).
    crop_fraction: evaluation crop fraction.
    reduced: decode JPEGs at a reduced scale when the crop allows it.

  Raises:
    CorruptImageError: the image cannot be decoded (names ``where``).
  """
  try:
    if isinstance(data, np.ndarray):
      image = data if data.shape[-1] == 3 else np.repeat(data[..., :1], 3, -1)
      if rng is not None:
        return _augment.random_resized_crop_flip_np(image, rng, size)
      return _augment.center_crop_resize_np(image, size, crop_fraction)
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size
      if rng is not None:
        top, left, h, w = _augment.sample_resized_crop_box(rng, height, width)
        flip = rng.random() < 0.5
      else:
        side = int(round(min(height, width) * crop_fraction))
        top, left, h, w = (height - side) // 2, (width - side) // 2, side, side
        flip = False
      if reduced and im.format == 'JPEG':
        # draft() picks the largest power-of-two reduction keeping the image
        # at least this big, i.e. the crop at least size x size.
        im.draft('RGB', (math.ceil(width * size / w),
                         math.ceil(height * size / h)))
      sx, sy = im.size[0] / width, im.size[1] / height
      rgb = im.convert('RGB')  # Decodes: truncated files fail here.
      out = rgb.resize((size, size), Image.BILINEAR,
                       box=(left * sx, top * sy, (left + w) * sx,
                            (top + h) * sy))
      out = np.asarray(out)
      return out[:, ::-1] if flip else out
  except CorruptImageError:
    raise
  except _DECODE_ERRORS as e:
    raise CorruptImageError(
        f'Cannot decode image {where}: {e}. Delete or replace the file, or '
        f"set data.on_corrupt='skip' to skip such images.") from None


# ---------------------------------------------------------------- iterators


@dataclasses.dataclass
class Builder:
  """Builds process-local batches; pickled to every Grain worker."""
  records: object
  size: int
  crop_fraction: float
  random: bool
  on_corrupt: str
  seed: int

  def example(self, row: int, epoch: int):
    """Row ``row`` cropped; under 'skip', corrupt rows give way to the next."""
    n = len(self.records)
    rng = (np.random.default_rng([self.seed, 2, epoch, row])
           if self.random else None)
    skipped = 0
    for k in range(MAX_SKIPS + 1):
      data, label, where = None, None, f'row {(row + k) % n}'
      try:
        data, label, where = self.records.fetch((row + k) % n)
        return decode_crop(data, where, size=self.size, rng=rng,
                           crop_fraction=self.crop_fraction), label, skipped
      except CorruptImageError:
        if self.on_corrupt != 'skip':
          raise
        logging.warning('Skipped corrupt image %s.', where)
        skipped += 1
    raise CorruptImageError(
        f'{MAX_SKIPS + 1} images in a row from row {row} are corrupt '
        f'(last: {where}); the data is broken, not one file.')

  def batch(self, rows, epoch: int, valid=None):
    b = len(rows)
    images = np.zeros((b, self.size, self.size, 3), np.uint8)
    labels = np.zeros(b, np.int32)
    skipped = np.zeros(b, np.int32)
    for j, row in enumerate(rows):
      if valid is None or valid[j]:
        images[j], labels[j], skipped[j] = self.example(int(row), epoch)
    return {'image': images, 'label': labels, 'skipped': skipped}


def _grain_stream(fn, start: int, stop: int | None, workers: int,
                  prefetch: int):
  """``fn(k)`` for ``k = start, start + 1, ...``, built by ``workers``."""
  if workers <= 0:
    import itertools  # pylint: disable=g-import-not-at-top
    ks = itertools.count(start) if stop is None else range(start, stop)
    return _iterators.prefetch(map(fn, ks), prefetch)
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    # Grain reads its absl flags in the workers; outside an absl app (a
    # notebook, pytest) they would be unparsed. Their defaults are wanted.
    flags.FLAGS(['cmim_jax'], known_only=True)
  ds = grain.MapDataset.range(start, stop if stop is not None else 2**62)
  ds = ds.map(fn).to_iter_dataset()
  return iter(ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=max(1, prefetch))))


class _Counted:
  """Drops the 'skipped' field of each batch and adds it to a counter."""

  def __init__(self, it, owner):
    self._it, self._owner = it, owner

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    n = int(batch.pop('skipped').sum())
    if n:
      self._owner.corrupt_skipped += n
      logging.warning('Skipped %d corrupt images (%d so far).', n,
                      self._owner.corrupt_skipped)
    return batch

  def close(self):
    if hasattr(self._it, 'close'):
      self._it.close()


class StreamTrainData(_iterators.TrainData):
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

  def get_batch(self, step: int) -> dict:
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}.')
    batch = self._build(int(step))
    self.corrupt_skipped += int(batch.pop('skipped').sum())
    return batch

  def iterator(self, start_step: int = 0, num_steps: int | None = None):
    stop = None if num_steps is None else start_step + num_steps
    return _Counted(_grain_stream(self._build, start_step, stop,
                                  self._workers, self._prefetch), self)


class StreamEvalData(_iterators.EvalData):
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
    batch['mask'] = valid.astype(np.float32)
    return batch

  def get_batch(self, k: int) -> dict:
    batch = self._build(k)
    self.corrupt_skipped += int(batch.pop('skipped').sum())
    return batch

  def iterator(self):
    return _Counted(_grain_stream(self._build, 0, self.num_batches,
                                  self._workers, self._prefetch), self)


# -------------------------------------------------------------- the sources


def open_splits(source: str, name: str, data_dir: str, split_names):
  """``(kind, location, {split: records}, class_names)`` for streaming.

  ``source`` 'auto' takes shards (a folder with ``cmim_jax_shards.json``),
  then an image folder, then tfds; 'shards', 'folder' and 'tfds' only that.
  """
  if source not in ('auto', 'folder', 'shards', 'tfds'):
    raise ValueError(f"data.source={source!r} cannot stream; use 'folder', "
                     f"'shards', 'tfds' or 'auto' (or data.pipeline="
                     f"'memory').")
  looked = []
  if source != 'tfds':
    try:
      return _open_local(source, data_dir, split_names)
    except _records.DataNotFoundError as e:
      if source != 'auto':
        raise
      looked.append(f'  - folder/shards: {e}')
  try:
    return _open_tfds(name, data_dir, split_names)
  except _records.DataNotFoundError as e:
    if source != 'auto':
      raise
    looked.append(f'  - tfds: {e}')
  raise _records.DataNotFoundError(
      f'No data found for {name!r} (data.data_dir={data_dir!r}). Looked at:\n'
      + '\n'.join(looked))


def _open_local(source, data_dir, split_names):
  if not data_dir or '://' in data_dir:
    raise _records.DataNotFoundError(
        f'data.data_dir={data_dir!r} is not a local folder.')
  root = os.path.realpath(os.path.expanduser(data_dir))
  if os.path.isfile(os.path.join(root, SHARDS_META)) and source != 'folder':
    meta = read_shards_meta(root)
    splits = {s: ShardSplit(root, split_folder(root, s), meta)
              for s in split_names}
    return 'shards', root, splits, tuple(meta['classes'])
  if source == 'shards':
    raise _records.DataNotFoundError(
        f'no {SHARDS_META} in {root}; make shards with `python -m '
        f'cmim_jax.data.convert IMAGE_FOLDER {data_dir}`.')
  if os.path.isfile(root):
    raise ValueError(
        f'data.data_dir={data_dir!r} is a file; streaming reads a folder '
        f'DIR/<split>/<class>/*.jpg or convert shards. Extract the archive, '
        f"or use data.pipeline='memory' for small datasets.")
  if not os.path.isdir(root):
    raise _records.DataNotFoundError(f'{root} does not exist.')
  dirs = {s: split_folder(root, s) for s in split_names}
  classes = sorted({c for s in split_names
                    for c, _ in list_split(os.path.join(root, dirs[s]))})
  splits = {s: FolderSplit(root, dirs[s], tuple(classes))
            for s in split_names}
  return 'folder', root, splits, tuple(classes)


# tfds's split names -> the folder names torchvision's ImageNet layout uses.
SPLIT_ALIASES = {'validation': 'val'}


def split_folder(root: str, split: str) -> str:
  """The folder (or shard split) of ``split`` under ``root``: ``split``,
  else its alias ('validation' -> 'val') when only that exists."""
  alias = SPLIT_ALIASES.get(split)
  if (alias and not os.path.isdir(os.path.join(root, split))
      and os.path.isdir(os.path.join(root, alias))):
    logging.info('Split %r read from %s.', split, os.path.join(root, alias))
    return alias
  return split


def _open_tfds(name, data_dir, split_names):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dd = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=dd)
  except tfds.core.registered.DatasetNotFoundError:
    raise _records.DataNotFoundError(
        f'tfds has no dataset named {name!r}.') from None
  where = f'tfds {name!r} in {builder.data_dir}'
  splits = {}
  for split in split_names:
    try:
      splits[split] = TfdsSplit(name, split, dd)
    except Exception as e:  # pylint: disable=broad-except
      if not builder.is_prepared():
        raise _records.DataNotFoundError(f'{where} is not prepared.') from None
      if split not in builder.info.splits:
        raise ValueError(f'{where} has no split {split!r}; it has '
                         f'{list(builder.info.splits)}.') from None
      raise ValueError(
          f'{where} cannot be streamed ({e}); streaming reads array_record '
          f'(prepare it with --file_format=array_record).') from None
  return ('tfds', where, splits,
          tuple(builder.info.features['label'].names))


def default_workers() -> int:
  return min(16, os.cpu_count() or 1)
