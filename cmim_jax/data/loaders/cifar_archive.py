"""The python-pickle CIFAR-10/100 archives, as a folder or as the .tar.gz.

With ``data.data_dir`` empty the loader looks in the data cache,
``cache_dir()``: ``$CMIM_JAX_DATA`` if set, else ``~/.cache/cmim_jax``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile
from pathlib import PurePosixPath

import numpy as np

from cmim_jax.data import records as _records

TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
CACHE_ENV = 'CMIM_JAX_DATA'
DEFAULT_CACHE_DIR = '~/.cache/cmim_jax'


def cache_dir() -> str:
  """Where CIFAR archives are looked for when ``data.data_dir`` is empty."""
  return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


@dataclasses.dataclass(frozen=True)
class _Archive:
  dirname: str
  tarname: str
  files: dict
  label_key: str
  meta_file: str
  names_key: str
  num_classes: int


ARCHIVES = {
    'cifar10': _Archive(
        'cifar-10-batches-py', 'cifar-10-python.tar.gz',
        {'train': tuple(f'data_batch_{i}' for i in range(1, 6)),
         'test': ('test_batch',)},
        'labels', 'batches.meta', 'label_names', 10),
    'cifar100': _Archive(
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


def _arrays(d: dict, where: str, spec: _Archive):
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


def read_tar_members(path: str, basenames: set) -> dict:
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


def load(name, data_dir, split_names, **_):
  """Loads ``split_names`` of the CIFAR archive in ``data_dir`` (or the cache)."""
  if name not in ARCHIVES:
    raise _records.DataNotFoundError(
        f'source cifar_archive reads only {sorted(ARCHIVES)}, not {name!r}.')
  spec = ARCHIVES[name]
  root = os.path.expanduser(data_dir) if data_dir else cache_dir()
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
    blobs = read_tar_members(tar, wanted)
    missing = sorted(wanted - set(blobs) - {spec.meta_file})
    if missing:
      raise ValueError(f'{tar} has no member(s) {missing}; expected the '
                       f'python version of {name} ({spec.tarname}).')
  else:
    where = ('' if data_dir else
             f' (data.data_dir is empty, so the data cache ${CACHE_ENV} or '
             f'{DEFAULT_CACHE_DIR})')
    raise _records.DataNotFoundError(
        f'no {spec.dirname}/ or {spec.tarname} at '
        f'{", ".join(candidates)} (or {os.path.join(root, spec.tarname)})'
        f'{where}.')
  splits = {}
  for split in split_names:
    parts = [_arrays(_unpickle(blobs[f], f'{location}:{f}'),
                     f'{location}:{f}', spec)
             for f in spec.files[split]]
    splits[split] = _records.ArrayRecords(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]))
  class_names = tuple(str(i) for i in range(spec.num_classes))
  if spec.meta_file in blobs:
    meta = _unpickle(blobs[spec.meta_file], f'{location}:{spec.meta_file}')
    names = meta.get(spec.names_key)
    if names is not None and len(names) == spec.num_classes:
      class_names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                          for n in names)
  return _records.SourceData('cifar_archive', location, splits,
                             spec.num_classes, class_names)
