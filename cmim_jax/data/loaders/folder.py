"""Image folders ``data_dir/<split>/<class>/*.{jpg,jpeg,png}``, or a tar(.gz) of one.

Images are decoded once (RGB, all of one size) and kept in memory, and as
.npy files in ``data.cache_dir`` when it is set.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from cmim_jax.data import records as _records
from cmim_jax.data.loaders.cifar_archive import TAR_SUFFIXES

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')

# Decoded splits, keyed by (path, split, fingerprint), so that train and eval
# splits of one folder, or a second get_datasets call, decode once.
ORDER_SEED = 0
_MEMORY_CACHE: dict = {}
_MEMORY_CACHE_SIZE = 4


def clear_cache() -> None:
  """Forgets the decoded folder splits held in memory."""
  _MEMORY_CACHE.clear()


def _is_image(filename: str) -> bool:
  return filename.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data: bytes, where: str) -> np.ndarray:
  """One encoded image -> uint8[H, W, 3]; ValueError naming ``where`` if bad."""
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
    image = decode_image(blob, name)
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


def _list_split(root: str, split: str):
  """Items of ``root/split/<class>/*`` sorted by (class, file)."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    have = sorted(e.name for e in os.scandir(root) if e.is_dir())
    raise _records.DataNotFoundError(
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


def _scan_tar(path: str, splits: set):
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
      raise _records.DataNotFoundError(
          f'no images under {s}/<class>/ in {path} (splits found: '
          f'{sorted(seen_splits)}; expected <split>/<class>/*.jpg members).')
    empty = class_dirs[s] - {c for _, c, _ in items[s]}
    if empty:
      raise ValueError(f'Class folder(s) {sorted(empty)} of split {s!r} in '
                       f'{path} are empty; add images or remove them.')
    items[s].sort(key=lambda it: (it[1], it[0]))
  return items


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
  return np.random.default_rng(ORDER_SEED).permutation(n)


def load(name, data_dir, split_names, *, cache_dir, **_):
  """Loads ``split_names`` of the image folder (or tar) at ``data_dir``.

  Label ids follow the sorted class names of the requested splits together.
  Example ``i`` of a split is file ``folder_order(n)[i]`` of its (class,
  file) sorted listing, so split slices are class-balanced and the same on
  every machine.

  Args:
    name: unused (any name; the classes come from the folders).
    data_dir: the folder, or a .tar/.tar.gz/.tgz of one.
    split_names: plain split names, each a subfolder.
    cache_dir: folder for decoded .npy copies ('' = memory only).
  """
  del name
  if not data_dir:
    raise _records.DataNotFoundError(
        'data.data_dir is empty (expected an image folder or a .tar.gz of '
        'one).')
  if '://' in data_dir:
    raise ValueError(f'source folder reads local paths only, got '
                     f'{data_dir!r}; use source tfds for buckets.')
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
      items, fingerprint = _list_split(root, split)
      listed[split] = items
      todo[split] = hashlib.sha1(
          f'{root} {fingerprint} {split}'.encode()).hexdigest()
  else:
    raise _records.DataNotFoundError(
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
    scanned = _scan_tar(root, set(missing))
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
    splits[split] = _records.ArrayRecords(images[order], remap[labels[order]])
  return _records.SourceData('folder', root, splits, len(classes),
                             tuple(classes))
