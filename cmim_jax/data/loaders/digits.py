"""scikit-learn's bundled 8x8 digits: a dataset that needs no download.

'train' is the first 1500 images of ``default_rng(0).permutation(1797)``,
'test' the remaining 297; pixels are scaled from 0..16 to uint8 0..255.
"""

from __future__ import annotations

import numpy as np

from cmim_jax.data import records as _records

SEED, NUM_TRAIN = 0, 1500


def load(name, data_dir, split_names, **_):
  """Loads ``split_names`` ('train', 'test') of the digits; ignores data_dir."""
  del data_dir
  if name != 'digits':
    raise _records.DataNotFoundError(
        f'source digits serves only name digits, not {name!r}.')
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise _records.DataNotFoundError(
        'scikit-learn is not installed.') from None
  bunch = datasets.load_digits()
  images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
  perm = np.random.default_rng(SEED).permutation(len(images))
  index = {'train': perm[:NUM_TRAIN], 'test': perm[NUM_TRAIN:]}
  splits = {}
  for split in split_names:
    if split not in index:
      raise ValueError(
          f'digits has splits {list(index)}, not {split!r}.')
    splits[split] = _records.ArrayRecords(images[index[split]],
                                          bunch.target[index[split]])
  return _records.SourceData('digits', 'sklearn.datasets.load_digits',
                             splits, 10, tuple(str(i) for i in range(10)))
