"""What is known about each dataset before any data is read.

Shapes, class counts, normalisation statistics, split names, the default
augmentation, and the order in which ``data.source='auto'`` tries the
loaders. A name not listed here (a custom image folder or tfds dataset) gets
``dataset_spec``'s generic entry.
"""

from __future__ import annotations

import dataclasses

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Pixel mean/std of the digits 'train' split on the 0..1 scale
# (tests/test_input_pipeline.py recomputes them from the data).
DIGITS_MEAN, DIGITS_STD = (0.3057,), (0.3759,)
# Unknown datasets (a custom folder or tfds name) without data.mean/data.std.
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What is known about a dataset before any data is read.

  Attributes:
    num_classes: number of classes, None if read from the data.
    image_shape: (H, W, C) of every image, None if images differ in size.
    mean: per-channel mean on the 0..1 scale, None for the default.
    std: per-channel std on the 0..1 scale, None for the default.
    splits: the split names the dataset ships with, None if unknown.
    augment: default augmentation mode for ``augment='auto'``.
    crop: 'pad_crop' (CIFAR-style) or 'resized_crop' (ImageNet-style).
    sources: the order in which ``source='auto'`` tries the loaders.
    how_to: how a user provides the data, for error messages.
    pad_mode: how the pad-crop pads: 'constant' (zeros) or 'reflect'
      (mirrored without repeating the edge, as torchvision's
      ``Pad(4, padding_mode='reflect')``).
  """
  num_classes: int | None
  image_shape: tuple[int, int, int] | None
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  splits: tuple[str, ...] | None
  augment: str
  crop: str
  sources: tuple[str, ...]
  how_to: str
  pad_mode: str = 'constant'


def _cifar_how_to(name, archive):
  # Only what the package itself installs: no `tfds build` (it needs
  # TensorFlow), but its own downloader.
  return (
      f'run with data.download=True (fetches {archive} into the data cache), '
      f'or `python -m cmim_jax.data.download {name}` on a machine with '
      f'internet, or put {archive} (or its extracted folder) in the data '
      f'cache ($CMIM_JAX_DATA, default ~/.cache/cmim_jax) or in '
      f'data.data_dir, or point data.data_dir at an image folder '
      f'DIR/<split>/<class>/*.png (or a .tar.gz of one).')


DATASETS = {
    'cifar10': DatasetSpec(
        10, (32, 32, 3), CIFAR10_MEAN, CIFAR10_STD, ('train', 'test'),
        'device', 'pad_crop', ('tfds', 'cifar_archive', 'folder'),
        _cifar_how_to('cifar10', 'cifar-10-python.tar.gz')),
    'cifar100': DatasetSpec(
        100, (32, 32, 3), CIFAR100_MEAN, CIFAR100_STD, ('train', 'test'),
        'device', 'pad_crop', ('tfds', 'cifar_archive', 'folder'),
        _cifar_how_to('cifar100', 'cifar-100-python.tar.gz'),
        # CMIM's released CIFAR-100 training code pads by reflection.
        pad_mode='reflect'),
    'imagenet2012': DatasetSpec(
        1000, None, IMAGENET_MEAN, IMAGENET_STD, ('train', 'validation'),
        'host', 'resized_crop', ('tfds',),
        'set data.data_dir=DIR to an image folder DIR/train/<wnid>/*.JPEG + '
        'DIR/val/<wnid>/*.JPEG (torchvision\'s layout), or to the shards '
        '`python -m cmim_jax.data.convert FOLDER DIR` makes of one (no '
        'TensorFlow needed), or to a tfds data dir: download '
        'ILSVRC2012_img_{train,val}.tar into DIR/downloads/manual, `pip '
        'install tensorflow` (tfds needs it to prepare, not to read), run '
        '`tfds build imagenet2012 --file_format=array_record --data_dir=DIR '
        '--manual_dir=DIR/downloads/manual` (a gs:// bucket works too).'),
    'digits': DatasetSpec(
        10, (8, 8, 1), DIGITS_MEAN, DIGITS_STD, ('train', 'test'), 'none',
        'pad_crop', ('digits',),
        'install scikit-learn (the digits ship with it).'),
}


def dataset_spec(name: str) -> DatasetSpec:
  """The spec of a known dataset, or a generic one for a custom name."""
  if name in DATASETS:
    return DATASETS[name]
  return DatasetSpec(
      None, None, None, None, None, 'device', 'pad_crop', ('tfds', 'folder'),
      f'point data.data_dir at an image folder DIR/<split>/<class>/*.jpg (or '
      f'a .tar.gz of one), or prepare tfds dataset {name!r} with '
      f'--file_format=array_record.')
