"""Picks the loader for ``data.source`` and reports every place it looked.

The parts: ``catalogue`` (what is known per dataset), ``records`` (split
and result types), ``loaders/`` (one module per source). ``source='auto'``
tries the dataset's loaders in catalogue order, collecting the
``DataNotFoundError`` of each; data that is found but bad raises
``ValueError`` and 'auto' does not hide it.
"""

from __future__ import annotations

from collections.abc import Sequence

from cmim_jax.data import catalogue
from cmim_jax.data import download as _download
from cmim_jax.data.loaders import cifar_archive
from cmim_jax.data.loaders import digits
from cmim_jax.data.loaders import folder
from cmim_jax.data.loaders import tfds
from cmim_jax.data.records import DataNotFoundError
from cmim_jax.data.records import SourceData

LOADERS = {
    'tfds': tfds.load,
    'cifar_archive': cifar_archive.load,
    'folder': folder.load,
    'digits': digits.load,
}
# Sources only the streaming pipeline reads (data/streaming.py).
STREAM_ONLY = ('shards',)
SOURCES = ('auto',) + tuple(LOADERS) + STREAM_ONLY


def load(source: str, name: str, data_dir: str, split_names: Sequence[str],
         *, cache_dir: str, num_threads: int, download: bool = False) -> SourceData:
  """Loads ``split_names`` of dataset ``name`` from ``source``.

  Args:
    source: one of ``SOURCES``; 'auto' tries ``dataset_spec(name).sources``
      in order and takes the first that finds data.
    name: dataset name ('cifar10', 'cifar100', 'imagenet2012', 'digits', or
      a custom name for a folder or tfds dataset).
    data_dir: path (or gs:// bucket for tfds); '' for the source's default
      place (tfds's data dir, the CIFAR archive cache).
    split_names: plain split names (no slicing).
    cache_dir: where the folder loader keeps decoded images ('' = memory).
    num_threads: threads for per-image reads (tfds).
    download: when no source finds a CIFAR dataset, fetch its python archive
      into the data cache (``cifar_archive.cache_dir()``) and load that.

  Raises:
    DataNotFoundError: no source found data; the message lists every place
      looked and how to provide the data.
    ValueError: data was found but is bad, or a split does not exist.
  """
  if source not in SOURCES:
    raise ValueError(f'data.source={source!r} is not one of {SOURCES}.')
  if source in STREAM_ONLY:
    raise ValueError(f"data.source={source!r} is read by the streaming "
                     f"pipeline only; set data.pipeline='stream' (or 'auto').")
  spec = catalogue.dataset_spec(name)
  order = spec.sources if source == 'auto' else (source,)
  looked = []
  for s in order:
    try:
      return LOADERS[s](name, data_dir, list(split_names),
                        cache_dir=cache_dir, num_threads=num_threads)
    except DataNotFoundError as e:
      looked.append(f'  - {s}: {e}')
  if name in _download.ARCHIVES and source in ('auto', 'cifar_archive'):
    if download:
      try:
        _download.ensure_cifar(name, cifar_archive.cache_dir())
        return cifar_archive.load(name, '', list(split_names))
      except _download.DownloadError as e:
        looked.append(f'  - download (data.download=True): {e}')
    else:
      looked.append('  - download: off (data.download=False)')
  raise DataNotFoundError(
      f'No data found for dataset {name!r} (data.source={source!r}, '
      f'data.data_dir={data_dir!r}). Looked at:\n' + '\n'.join(looked)
      + f'\nTo provide it: {spec.how_to}')
