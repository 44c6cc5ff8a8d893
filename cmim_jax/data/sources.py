"""Where examples come from: tfds, CIFAR pickle archives, image folders, digits.

Every loader returns a ``SourceData`` whose splits are random-access
``Records``: ``len(records)`` and ``records.read(indices) -> (images,
labels)``. Small datasets are decoded once into uint8 arrays in memory
(``ArrayRecords``); tfds ``data_source`` datasets are read lazily, a batch at
a time (``TfdsRecords``), so ImageNet never has to fit in memory.

A loader that finds no data raises ``DataNotFoundError`` (a
``FileNotFoundError``) saying where it looked; ``source='auto'`` collects
those and moves on. Data that is found but bad (corrupt image, wrong shape,
label out of range) raises ``ValueError`` naming the file, and ``'auto'``
does not hide it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

SOURCES = ('auto', 'tfds', 'cifar_archive', 'folder', 'digits')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Pixel mean/std of the digits 'train' partition on the 0..1 scale
# (tests/test_data_sources.py recomputes them).
DIGITS_MEAN, DIGITS_STD = (0.3057,), (0.3759,)
# Unknown datasets (a custom folder or tfds name) without data.mean/data.std.
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5

# Digits: a fixed permutation of the 1797 images; 'train' is its first 1500,
# 'test' the other 297.
DIGITS_SEED, DIGITS_NUM_TRAIN = 0, 1500


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What is known about a dataset before any data is read.

  Attributes:
    num_classes: number of classes, None if read from the data.
    image_shape: (H, W, C) of every image, None if images differ in size.
    mean: per-channel mean on the 0..1 scale, None for the default.
    std: per-channel std on the 0..1 scale, None for the default.
    augment: default augmentation mode for ``augment='auto'``.
    crop: 'pad_crop' (CIFAR-style) or 'resized_crop' (ImageNet-style).
    sources: the order in which ``source='auto'`` tries the loaders.
    how_to: how a user provides the data, for error messages.
  """
  num_classes: int | None
  image_shape: tuple[int, int, int] | None
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  augment: str
  crop: str
  sources: tuple[str, ...]
  how_to: str


def _cifar_how_to(name, archive):
  return (
      f'prepare it with tfds (`tfds build {name} --file_format=array_record '
      f'--data_dir=DIR`, then data.data_dir=DIR), or put the python CIFAR '
      f'archive ({archive} or its extracted folder) in data.data_dir, or '
      f'point data.data_dir at an image folder DIR/<split>/<class>/*.png '
      f'(or a .tar.gz of one).')


DATASETS = {
    'cifar10': DatasetSpec(
        10, (32, 32, 3), CIFAR10_MEAN, CIFAR10_STD, 'device', 'pad_crop',
        ('tfds', 'cifar_archive', 'folder'),
        _cifar_how_to('cifar10', 'cifar-10-python.tar.gz')),
    'cifar100': DatasetSpec(
        100, (32, 32, 3), CIFAR100_MEAN, CIFAR100_STD, 'device', 'pad_crop',
        ('tfds', 'cifar_archive', 'folder'),
        _cifar_how_to('cifar100', 'cifar-100-python.tar.gz')),
    'imagenet2012': DatasetSpec(
        1000, None, IMAGENET_MEAN, IMAGENET_STD, 'host', 'resized_crop',
        ('tfds',),
        'download ILSVRC2012_img_{train,val}.tar into DIR/downloads/manual '
        'and run `tfds build imagenet2012 --file_format=array_record '
        '--data_dir=DIR --manual_dir=DIR/downloads/manual`, then set '
        'data.data_dir=DIR (a gs:// bucket works too).'),
    'digits': DatasetSpec(
        10, (8, 8, 1), DIGITS_MEAN, DIGITS_STD, 'none', 'pad_crop',
        ('digits',), 'install scikit-learn (the digits ship with it).'),
}


def dataset_spec(name: str) -> DatasetSpec:
  """The spec of a known dataset, or a generic one for a custom name."""
  if name in DATASETS:
    return DATASETS[name]
  return DatasetSpec(
      None, None, None, None, 'device', 'pad_crop', ('tfds', 'folder'),
      f'point data.data_dir at an image folder DIR/<split>/<class>/*.jpg (or '
      f'a .tar.gz of one), or prepare tfds dataset {name!r} with '
      f'--file_format=array_record.')


class DataNotFoundError(FileNotFoundError):
  """A source found no data where it looked (the message says where)."""


# ------------------------------------------------------------------ records


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


class TfdsRecords:
  """A tfds ``data_source`` split, read and decoded a batch at a time."""

  def __init__(self, data_source, num_threads: int = 0):
    self._ds = data_source
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads)
                  if num_threads > 1 else None)
    self.image_shape = None  # Unknown until read; may vary (ImageNet).

  def __len__(self) -> int:
    return len(self._ds)

  def read(self, idx: np.ndarray):
    keys = [int(i) for i in idx]
    if self._pool is None:
      records = [self._ds[k] for k in keys]
    else:
      # Decoding (PIL) releases the GIL, so threads overlap it.
      records = list(self._pool.map(self._ds.__getitem__, keys))
    labels = np.array([r['label'] for r in records], np.int32)
    images = [np.asarray(r['image']) for r in records]
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
    if images and all(im.shape == images[0].shape for im in images):
      return np.stack(images), labels
    return images, labels


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


# --------------------------------------------------------------------- tfds


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def load_tfds(name, data_dir, split_names, *, num_threads=0, **_):
  """tfds: ``data_source`` (array_record) first, ``tfds.load`` if TF exists."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if data_dir and os.path.isfile(os.path.expanduser(data_dir)):
    raise DataNotFoundError(f'data.data_dir={data_dir!r} is a file, not a '
                            f'tfds data directory.')
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataNotFoundError(f'tfds has no dataset named {name!r}.') from None
  where = f'tfds {name!r} in {builder.data_dir}'
  features = builder.info.features
  label = features['label'] if 'label' in features else None
  class_names = tuple(label.names) if label is not None else ()
  splits = {}
  for split in split_names:
    try:
      # Never download: data must be prepared offline (download=False).
      ds = tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
      splits[split] = TfdsRecords(ds, num_threads)
      continue
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if not builder.is_prepared():
      # tfds's own error here talks about file formats; the data is absent.
      raise DataNotFoundError(f'{where} is not prepared.')
    known = list(builder.info.splits)
    if split not in known:
      raise ValueError(f'{where} has no split {split!r}; it has {known}.')
    if not _tensorflow_available():
      raise DataNotFoundError(
          f'{where} is prepared as {builder.info.file_format}, which needs '
          f'TensorFlow; install tensorflow, or prepare it again with '
          f'--file_format=array_record ({error}).')
    # TensorFlow path: only for datasets that fit in memory at one size.
    arrays = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir,
                                     batch_size=-1, download=False))
    splits[split] = ArrayRecords(np.asarray(arrays['image'], np.uint8),
                                 np.asarray(arrays['label'], np.int32))
  return SourceData('tfds', where, splits, len(class_names), class_names)


# ------------------------------------------------------------ CIFAR archive


@dataclasses.dataclass(frozen=True)
class _CifarArchive:
  dirname: str
  tarname: str
  files: dict
  label_key: str
  meta_file: str
  names_key: str
  num_classes: int


_CIFAR_ARCHIVES = {
    'cifar10': _CifarArchive(
        'cifar-10-batches-py', 'cifar-10-python.tar.gz',
        {'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
         'test': ('test_batch',)},
        'labels', 'batches.meta', 'label_names', 10),
    'cifar100': _CifarArchive(
        'cifar-100-python', 'cifar-100-python.tar.gz',
        {'train': ('train',), 'test': ('test',)},
        'fine_labels', 'meta', 'fine_label_names', 100),
}


def _str_keys(d):
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _unpickle(data: bytes, where: str) -> dict:
  try:
    # encoding='bytes' reads the original Python 2 pickles of the release.
    d = pickle.loads(data, encoding='bytes')
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Cannot unpickle {where}: {e}.') from None
  if not isinstance(d, dict):
    raise ValueError(f'{where} holds a {type(d).__name__}, not a dict.')
  return _str_keys(d)


def _cifar_arrays(d: dict, where: str, spec: _CifarArchive):
  for key in ('data', spec.label_key):
    if key not in d:
      raise ValueError(f'{where} has no key {key!r} (keys: {sorted(d)}).')
  data, labels = d['data'], np.asarray(d[spec.label_key])
  if (not isinstance(data, np.ndarray) or data.ndim != 2
      or data.shape[1] != 3072 or data.dtype != np.uint8):
    shape = getattr(data, 'shape', None)
    raise ValueError(f"{where}: 'data' is {type(data).__name__} "
                     f'{getattr(data, "dtype", "")}{shape}, expected uint8 '
                     f'(N, 3072) rows of CHW 32x32x3 pixels.')
  if labels.shape != (len(data),):
    raise ValueError(f'{where}: {len(data)} images but labels of shape '
                     f'{labels.shape}.')
  if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
    raise ValueError(
        f'{where}: labels out of range [0, {spec.num_classes}): found '
        f'{labels.min()}..{labels.max()}. Is this the right archive for '
        f'{spec.dirname}?')
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _read_tar_members(path: str, basenames: set) -> dict:
  """Bytes of the regular members of a tar whose basename is wanted."""
  found = {}
  try:
    with tarfile.open(path, 'r|*') as tf:
      for m in tf:
        base = PurePosixPath(m.name).name
        if m.isfile() and base in basenames:
          found[base] = tf.extractfile(m).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f'Cannot read archive {path}: {e}.') from None
  return found


def load_cifar_archive(name, data_dir, split_names, **_):
  """The python-pickle CIFAR archives, as a folder or as the .tar.gz."""
  if name not in _CIFAR_ARCHIVES:
    raise DataNotFoundError(
        f'source cifar_archive reads only {sorted(_CIFAR_ARCHIVES)}, '
        f'not {name!r}.')
  spec = _CIFAR_ARCHIVES[name]
  if not data_dir:
    raise DataNotFoundError(f'data.data_dir is empty (looked for '
                            f'{spec.dirname}/ or {spec.tarname}).')
  root = os.path.expanduser(data_dir)
  for split in split_names:
    if split not in spec.files:
      raise ValueError(f'The {name} archive has splits {list(spec.files)}, '
                       f'not {split!r}.')
  probe = spec.files['test'][0]
  candidates = [root, os.path.join(root, spec.dirname)]
  folder = next((c for c in candidates
                 if os.path.isfile(os.path.join(c, probe))), None)
  tar = next((c for c in (root, os.path.join(root, spec.tarname))
              if os.path.isfile(c) and c.endswith(TAR_SUFFIXES)), None)
  wanted = {f for s in split_names for f in spec.files[s]} | {spec.meta_file}
  if folder is not None:
    location = folder
    blobs = {}
    for f in sorted(wanted):
      p = os.path.join(folder, f)
      if not os.path.isfile(p):
        if f == spec.meta_file:
          continue
        raise FileNotFoundError(f'{p} is missing from the {name} archive '
                                f'folder {folder}.')
      with open(p, 'rb') as fh:
        blobs[f] = fh.read()
  elif tar is not None:
    location = tar
    blobs = _read_tar_members(tar, wanted)
    missing = sorted(wanted - set(blobs) - {spec.meta_file})
    if missing:
      raise ValueError(f'{tar} has no member(s) {missing}; expected the '
                       f'python version of {name} ({spec.tarname}).')
  else:
    raise DataNotFoundError(
        f'no {spec.dirname}/ or {spec.tarname} at '
        f'{", ".join(candidates)} (or {os.path.join(root, spec.tarname)}).')
  splits = {}
  for split in split_names:
    parts = [_cifar_arrays(_unpickle(blobs[f], f'{location}:{f}'),
                           f'{location}:{f}', spec)
             for f in spec.files[split]]
    splits[split] = ArrayRecords(np.concatenate([p[0] for p in parts]),
                                 np.concatenate([p[1] for p in parts]))
  class_names = tuple(str(i) for i in range(spec.num_classes))
  if spec.meta_file in blobs:
    meta = _unpickle(blobs[spec.meta_file], f'{location}:{spec.meta_file}')
    names = meta.get(spec.names_key)
    if names is not None and len(names) == spec.num_classes:
      class_names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                          for n in names)
  return SourceData('cifar_archive', location, splits, spec.num_classes,
                    class_names)


# -------------------------------------------------------------- image folder

# Decoded folder splits, keyed by (path, split, fingerprint), so that train and
# eval splits of one folder, or a second get_datasets call, decode once.
FOLDER_ORDER_SEED = 0
_MEMORY_CACHE: dict = {}
_MEMORY_CACHE_SIZE = 4


def clear_cache() -> None:
  """Forgets the decoded folder splits held in memory."""
  _MEMORY_CACHE.clear()


def _is_image(filename: str) -> bool:
  return filename.lower().endswith(IMAGE_EXTENSIONS)


def _decode_image(data: bytes, where: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Truncated files fail here, not later.
      if im.mode != 'RGB':
        im = im.convert('RGB')
      return np.asarray(im)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'Cannot decode image {where}: {e}. Delete or replace '
                     f'the file.') from None


def _decode_split(items, where: str):
  """Decodes ``[(display_name, class, bytes_or_path)]`` into one array."""
  if not items:
    raise ValueError(f'{where} holds no images ({", ".join(IMAGE_EXTENSIONS)}).')
  classes = sorted({c for _, c, _ in items})
  class_id = {c: i for i, c in enumerate(classes)}
  images, labels, first = None, np.empty(len(items), np.int32), None
  for i, (name, cls, blob) in enumerate(items):
    if isinstance(blob, str):
      with open(blob, 'rb') as fh:
        blob = fh.read()
    image = _decode_image(blob, name)
    if images is None:
      first = name
      images = np.empty((len(items),) + image.shape, np.uint8)
    elif image.shape != images.shape[1:]:
      raise ValueError(
          f'Image {name} has size {image.shape[1]}x{image.shape[0]} '
          f'(shape {image.shape}) but {first} has '
          f'{images.shape[2]}x{images.shape[1]} (shape {images.shape[1:]}); '
          f'a folder dataset needs one image size: resize the images '
          f'offline.')
    images[i] = image
    labels[i] = class_id[cls]
  return images, labels, tuple(classes)


def _list_folder_split(root: str, split: str):
  """Items of ``root/split/<class>/*`` sorted by (class, file)."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    have = sorted(e.name for e in os.scandir(root) if e.is_dir())
    raise DataNotFoundError(
        f'no split folder {split_dir} (the folders in {root} are {have}; '
        f'expected data_dir/<split>/<class>/*.jpg).')
  entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
  class_dirs = [e for e in entries if e.is_dir()]
  if not class_dirs:
    raise ValueError(f'{split_dir} has no class folders; expected '
                     f'{split_dir}/<class>/*.jpg.')
  items, stats = [], []
  for c in class_dirs:
    files = sorted((e for e in os.scandir(c.path)
                    if e.is_file() and _is_image(e.name)),
                   key=lambda e: e.name)
    if not files:
      raise ValueError(
          f'Class folder {c.path} is empty (no {", ".join(IMAGE_EXTENSIONS)} '
          f'files); add images or remove the folder.')
    for f in files:
      st = f.stat()
      items.append((f.path, c.name, f.path))
      stats.append(f'{c.name}/{f.name} {st.st_size} {st.st_mtime_ns}')
  fingerprint = hashlib.sha1('\n'.join(stats).encode()).hexdigest()
  return items, fingerprint


def _scan_tar_folder(path: str, splits: set):
  """Reads ``[prefix/]<split>/<class>/<file>`` image members of a tar."""
  items = {s: [] for s in splits}
  class_dirs = {s: set() for s in splits}
  seen_splits = set()
  try:
    with tarfile.open(path, 'r|*') as tf:
      for m in tf:
        parts = PurePosixPath(m.name).parts
        if m.isdir() and len(parts) >= 2 and parts[-2] in splits:
          class_dirs[parts[-2]].add(parts[-1])
        elif m.isfile() and len(parts) >= 3 and _is_image(parts[-1]):
          split, cls = parts[-3], parts[-2]
          seen_splits.add(split)
          if split in splits:
            items[split].append((f'{path}:{m.name}', cls,
                                 tf.extractfile(m).read()))
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f'Cannot read archive {path}: {e}.') from None
  for s in splits:
    if not items[s]:
      raise DataNotFoundError(
          f'no images under {s}/<class>/ in {path} (splits found: '
          f'{sorted(seen_splits)}; expected <split>/<class>/*.jpg members).')
    empty = class_dirs[s] - {c for _, c, _ in items[s]}
    if empty:
      raise ValueError(f'Class folder(s) {sorted(empty)} of split {s!r} in '
                       f'{path} are empty; add images or remove them.')
    items[s].sort(key=lambda it: (it[1], it[0]))
  return items


def _check_cache_dir(cache_dir: str) -> None:
  # A cache of decoded images inside a git checkout would end up committed.
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.realpath(__file__))))
  if not os.path.isdir(os.path.join(repo, '.git')):
    return
  real = os.path.realpath(os.path.expanduser(cache_dir))
  if real == repo or real.startswith(repo + os.sep):
    raise ValueError(
        f'data.cache_dir={cache_dir!r} is inside the repository {repo}; '
        f"use a folder outside it, e.g. '~/.cache/cmim_jax'.")


def _cache_paths(cache_dir: str, key: str):
  stem = os.path.join(os.path.expanduser(cache_dir), f'folder-{key}')
  return stem + '.images.npy', stem + '.labels.npy', stem + '.json'


def _read_disk_cache(cache_dir, key):
  images_p, labels_p, meta_p = _cache_paths(cache_dir, key)
  if not os.path.isfile(meta_p):  # Written last: its presence means complete.
    return None
  with open(meta_p) as fh:
    classes = tuple(json.load(fh)['classes'])
  return np.load(images_p), np.load(labels_p), classes


def _write_disk_cache(cache_dir, key, decoded):
  os.makedirs(os.path.expanduser(cache_dir), exist_ok=True)
  paths = _cache_paths(cache_dir, key)
  images, labels, classes = decoded
  # Write-then-rename so that concurrent processes never read half a file.
  for path, array in zip(paths[:2], (images, labels)):
    tmp = f'{path}.{os.getpid()}.tmp.npy'
    np.save(tmp, array)
    os.replace(tmp, path)
  tmp = f'{paths[2]}.{os.getpid()}.tmp'
  with open(tmp, 'w') as fh:
    json.dump({'classes': list(classes)}, fh)
  os.replace(tmp, paths[2])


def folder_order(n: int) -> np.ndarray:
  """Row ``i`` of an ``n``-image folder split is file ``folder_order(n)[i]``."""
  return np.random.default_rng(FOLDER_ORDER_SEED).permutation(n)


def load_folder(name, data_dir, split_names, *, cache_dir='', **_):
  """``data_dir/<split>/<class>/*.{jpg,jpeg,png}``, a folder or a tar(.gz).

  Label ids follow the sorted class names of the requested splits together.
  Example ``i`` of a split is file ``folder_order(n)[i]`` of its (class,
  file) sorted listing, so split slices are class-balanced and the same on
  every machine.
  Images are decoded once (RGB, all of one size) and kept in memory, and in
  ``cache_dir`` as .npy files if given.
  """
  del name
  if not data_dir:
    raise DataNotFoundError('data.data_dir is empty (expected an image '
                            'folder or a .tar.gz of one).')
  if '://' in data_dir:
    raise ValueError(f'source folder reads local paths only, got '
                     f'{data_dir!r}; use source tfds for buckets.')
  if cache_dir:
    _check_cache_dir(cache_dir)
  root = os.path.realpath(os.path.expanduser(data_dir))
  decoded, todo = {}, {}
  if os.path.isfile(root) and root.endswith(TAR_SUFFIXES):
    st = os.stat(root)
    for split in split_names:
      todo[split] = hashlib.sha1(
          f'{root} {st.st_size} {st.st_mtime_ns} {split}'.encode()).hexdigest()
    listed = None
  elif os.path.isdir(root):
    listed = {}
    for split in split_names:
      items, fingerprint = _list_folder_split(root, split)
      listed[split] = items
      todo[split] = hashlib.sha1(
          f'{root} {fingerprint} {split}'.encode()).hexdigest()
  else:
    raise DataNotFoundError(
        f'{root} is neither a folder nor a {"/".join(TAR_SUFFIXES)} file.')
  for split, key in list(todo.items()):
    key = f'{split}-{key[:16]}'
    todo[split] = key
    hit = _MEMORY_CACHE.get(key)
    if hit is None and cache_dir:
      hit = _read_disk_cache(cache_dir, key)
    if hit is not None:
      decoded[split] = hit
  missing = [s for s in split_names if s not in decoded]
  if missing and listed is None:
    scanned = _scan_tar_folder(root, set(missing))
  for split in missing:
    items = listed[split] if listed is not None else scanned[split]
    logging.info('Decoding %d images of split %r from %s.', len(items),
                 split, root)
    decoded[split] = _decode_split(items, f'{root}/{split}')
    if cache_dir:
      _write_disk_cache(cache_dir, todo[split], decoded[split])
  for split in split_names:
    _MEMORY_CACHE[todo[split]] = decoded[split]
    while len(_MEMORY_CACHE) > _MEMORY_CACHE_SIZE:
      _MEMORY_CACHE.pop(next(iter(_MEMORY_CACHE)))
  classes = sorted({c for s in split_names for c in decoded[s][2]})
  if any(decoded[s][2] != tuple(classes) for s in split_names):
    logging.warning('Splits %s of %s have different class folders; labels '
                    'follow their union %s.', split_names, root, classes)
  splits = {}
  for split in split_names:
    images, labels, own = decoded[split]
    remap = np.array([classes.index(c) for c in own], np.int32)
    # Files are listed class by class; like tfds's prepared splits, the
    # examples come in a fixed pseudo-random order instead, so that a slice
    # such as 'train[45000:]' holds every class, not only the last one.
    order = folder_order(len(labels))
    splits[split] = ArrayRecords(images[order], remap[labels[order]])
  return SourceData('folder', root, splits, len(classes), tuple(classes))


# ------------------------------------------------------------------- digits


def load_digits(name, data_dir, split_names, **_):
  """scikit-learn's bundled 8x8 digits, scaled from 0..16 to uint8 0..255.

  'train' is the first 1500 images of ``default_rng(0).permutation(1797)``,
  'test' the remaining 297.
  """
  del data_dir
  if name != 'digits':
    raise DataNotFoundError(f'source digits serves only name digits, not '
                            f'{name!r}.')
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataNotFoundError('scikit-learn is not installed.') from None
  bunch = datasets.load_digits()
  images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
  perm = np.random.default_rng(DIGITS_SEED).permutation(len(images))
  index = {'train': perm[:DIGITS_NUM_TRAIN], 'test': perm[DIGITS_NUM_TRAIN:]}
  splits = {}
  for split in split_names:
    if split not in index:
      raise ValueError(f"digits has splits ['train', 'test'], not {split!r}.")
    splits[split] = ArrayRecords(images[index[split]],
                                 bunch.target[index[split]])
  return SourceData('digits', 'sklearn.datasets.load_digits', splits, 10,
                    tuple(str(i) for i in range(10)))


LOADERS = {
    'tfds': load_tfds,
    'cifar_archive': load_cifar_archive,
    'folder': load_folder,
    'digits': load_digits,
}


def load(source: str, name: str, data_dir: str, split_names: Sequence[str],
         **kwargs) -> SourceData:
  """Loads ``split_names`` of dataset ``name`` from ``source``.

  Args:
    source: one of ``SOURCES``; 'auto' tries ``dataset_spec(name).sources``
      in order and takes the first that finds data.
    name: dataset name ('cifar10', 'cifar100', 'imagenet2012', 'digits', or
      a custom name for a folder or tfds dataset).
    data_dir: path (or gs:// bucket for tfds); '' for the tfds default.
    split_names: plain split names (no slicing).
    **kwargs: ``cache_dir``, ``num_threads``.

  Raises:
    DataNotFoundError: no source found data; the message lists every place
      looked and how to provide the data.
    ValueError: data was found but is bad, or a split does not exist.
  """
  if source not in SOURCES:
    raise ValueError(f'data.source={source!r} is not one of {SOURCES}.')
  spec = dataset_spec(name)
  order = spec.sources if source == 'auto' else (source,)
  looked = []
  for s in order:
    try:
      return LOADERS[s](name, data_dir, list(split_names), **kwargs)
    except DataNotFoundError as e:
      looked.append(f'  - {s}: {e}')
  raise DataNotFoundError(
      f'No data found for dataset {name!r} (data.source={source!r}, '
      f'data.data_dir={data_dir!r}). Looked at:\n' + '\n'.join(looked)
      + f'\nTo provide it: {spec.how_to}')
