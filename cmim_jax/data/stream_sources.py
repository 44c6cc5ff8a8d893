"""Streamed splits: image folders listed (not decoded), ArrayRecord shards
(``python -m cmim_jax.data.convert``) and tfds array_record data, each a
``len()`` plus ``fetch(row) -> (encoded bytes or array, label, where)``.

Nothing here decodes an image: the workers of ``data/streaming.py`` fetch
rows and decode them with ``data/decode.py``. Host memory is the listing (a
few dozen bytes per file, held as one byte buffer) however large the split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import zlib

import numpy as np

from cmim_jax.data import records as _records
from cmim_jax.data.decode import CorruptImageError
from cmim_jax.data.decode import DECODE_ERRORS
from cmim_jax.data.loaders import folder as _folder
from cmim_jax.data.loaders import tfds as _tfds



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


class _LazySource:
  """A split whose reader is opened on first use, in the process using it:
  readers (file handles, tfds sources) do not pickle to Grain workers."""
  _n = 0
  _source = None

  def _open(self):
    raise NotImplementedError

  def _reader(self):
    if self._source is None:
      self._source = self._open()
    return self._source

  def __len__(self):
    return self._n

  def __getstate__(self):
    return {**self.__dict__, '_source': None}


class ShardSplit(_LazySource):
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

  def _open(self):
    from grain import sources  # pylint: disable=g-import-not-at-top
    return sources.ArrayRecordDataSource(self._paths)

  def fetch(self, i: int):
    where = f'record {i} of the shards {os.path.dirname(self._paths[0])}'
    try:
      record = self._reader()[i]
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


class TfdsSplit(_LazySource):
  """A tfds array_record split, read through ``tfds.data_source``.

  tfds decodes the image itself (no reduced-size JPEG decoding), in the
  worker that reads it.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    self._args = (name, split, data_dir)
    self._n = len(self._open())

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.data_source(self._args[0], split=self._args[1],
                            data_dir=self._args[2], download=False)

  def fetch(self, i: int):
    where = f'tfds {self._args[0]} {self._args[1]}[{i}]'
    try:
      row = self._reader()[int(i)]
    except DECODE_ERRORS as e:
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
  attempts = []
  if source != 'tfds':
    attempts.append(('folder/shards', lambda: _open_local(
        source, data_dir, split_names)))
  if source in ('auto', 'tfds'):
    attempts.append(('tfds', lambda: _open_tfds(name, data_dir,
                                                split_names)))
  looked = []
  for kind, attempt in attempts:
    try:
      return attempt()
    except _records.DataNotFoundError as e:
      if source != 'auto':
        raise
      looked.append(f'  - {kind}: {e}')
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
  builder, where, data_dir = _tfds.open_builder(name, data_dir)
  splits = {}
  for split in split_names:
    try:
      splits[split] = TfdsSplit(name, split, data_dir)
      continue
    except Exception as e:  # pylint: disable=broad-except
      error = e
    _tfds.check_split(builder, where, split)
    raise ValueError(
        f'{where} cannot be streamed ({error}); streaming reads array_record '
        f'(prepare it with --file_format=array_record).')
  return ('tfds', where, splits,
          tuple(builder.info.features['label'].names))
