"""Input pipeline: datasets, splits, augmentation and multi-host batches.

The host yields uint8 batches ``{'image': uint8[b, H, W, C], 'label':
int32[b]}`` (plus ``'mask'`` for evaluation); ``preprocess_on_device`` turns
them into normalised float32 inside the jitted step, applying the CIFAR
pad-crop-flip there when ``augment == 'device'``. Typical use::

  train, evals, info = input_pipeline.get_datasets(
      config.data, global_batch_size=256, seed=config.seed)
  for step, batch in zip(range(start, total), train.iterator(start)):
    batch = input_pipeline.to_global_array(batch, sharding)
    ...  # in the step, on each device's rows of the batch:
         # x = preprocess_on_device(rng, batch['image'], info=info,
         #     train=True, augment=config.data.augment,
         #     index_offset=jax.lax.axis_index('data') * local_batch)

Small datasets are decoded once into memory; large ones or ones of many image
sizes (ImageNet; ``data.pipeline``) are streamed, decoded and cropped per
batch in Grain worker processes, from an image folder, ArrayRecord shards
(``python -m cmim_jax.data.convert``) or tfds array_record data
(``cmim_jax/data/streaming.py``), with the same batch contract.

Sources (``data.source``): 'tfds' (``tfds.data_source`` on array_record
data; ``tfds.load`` only if TensorFlow is installed), 'cifar_archive' (the
python-pickle CIFAR archives, folder or .tar.gz), 'folder'
(``data_dir/<split>/<class>/*.{jpg,jpeg,png}``, folder or .tar.gz, decoded
once into memory), 'digits' (scikit-learn's 8x8 digits, offline) and 'auto'
(the first that finds data). Splits use tfds slicing for every source
(``train[:90%]``, ``train[45000:]``, ...). See ``cmim_jax.data`` for the
parts and docs/CONTRACTS.md for the interface.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from cmim_jax import default_config
from cmim_jax.data import augment as _augment
from cmim_jax.data import catalogue as _catalogue
from cmim_jax.data import iterators as _iterators
from cmim_jax.data import records as _records
from cmim_jax.data import sources as _sources
from cmim_jax.data import splits as _splits
from cmim_jax.data import streaming as _streaming
# Re-exported: the public names of the data package.
# pylint: disable=unused-import
from cmim_jax.data.augment import example_keys
from cmim_jax.data.augment import normalize
from cmim_jax.data.augment import pad_crop_flip
from cmim_jax.data.augment import preprocess_on_device
from cmim_jax.data.iterators import EvalData
from cmim_jax.data.iterators import TrainData
from cmim_jax.data.loaders.folder import clear_cache
from cmim_jax.data.records import DataNotFoundError
from cmim_jax.data.records import DatasetInfo
from cmim_jax.data.splits import resolve_split
from cmim_jax.data.splits import split_names
# pylint: enable=unused-import


# The keys of the ``data`` config section; get_datasets reads each of them and
# accepts no other.
DATA_KEYS = ('name', 'source', 'data_dir', 'train_split', 'eval_split',
             'augment', 'cache_dir', 'image_size', 'eval_crop_fraction',
             'mean', 'std', 'prefetch', 'num_threads', 'download',
             'pipeline', 'workers', 'on_corrupt')


def get_config() -> ml_collections.ConfigDict:
  """The default ``data`` section (``DATA_KEYS``), locked.

  Defined once, in :func:`cmim_jax.default_config.data_config`;
  ``get_datasets`` itself has no defaults.
  """
  c = default_config.data_config()
  c.lock()
  return c


def _checked_config(data_config) -> ml_collections.ConfigDict:
  # Every key is read and none has a default here: a missing key would
  # otherwise silently take a value from a second copy of the defaults.
  given = set(dict(data_config))
  missing = [k for k in DATA_KEYS if k not in given]
  unknown = sorted(given - set(DATA_KEYS))
  if missing or unknown:
    raise ValueError(
        f'The data config must have exactly the keys {DATA_KEYS}; missing '
        f'{missing}, unknown {unknown}. Start from the full default data '
        f'section (configs/default.py) and override keys, or fix the '
        f'spelling.')
  cfg = ml_collections.ConfigDict(dict(data_config))
  for key, allowed in (('source', _sources.SOURCES),
                       ('pipeline', _streaming.PIPELINES),
                       ('on_corrupt', _streaming.ON_CORRUPT),
                       ('augment', _augment.AUGMENT_MODES)):
    if cfg[key] not in allowed:
      raise ValueError(f'data.{key}={cfg[key]!r} is not one of {allowed}.')
  return cfg


def _check_batch(what: str, size: int, process_count: int):
  if size <= 0 or size % process_count:
    raise ValueError(
        f'{what}={size} must be a positive multiple of process_count='
        f'{process_count} (each process takes an equal share); use e.g. '
        f'{max(1, size // process_count) * process_count}.')


def get_datasets(data_config, *, global_batch_size: int,
                 eval_batch_size: int | None = None, seed: int,
                 process_index: int | None = None,
                 process_count: int | None = None):
  """Builds the training and evaluation data for this process.

  Args:
    data_config: the ``data`` config section (see ``get_config``).
    global_batch_size: training examples per step over all processes.
    eval_batch_size: evaluation examples per batch over all processes
      (default ``global_batch_size``).
    seed: shuffling and host-augmentation seed.
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Returns:
    ``(train, eval, info)``: a ``TrainData``, an ``EvalData`` (None when
    ``eval_split`` is ''), and a ``DatasetInfo``.

  Raises:
    DataNotFoundError: no data where the config points (lists where it
      looked and how to provide the data).
    ValueError: bad config, split string, batch size, or data.
  """
  cfg = _checked_config(data_config)
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  eval_batch_size = eval_batch_size or global_batch_size
  _check_batch('global_batch_size', global_batch_size, process_count)
  _check_batch('eval_batch_size', eval_batch_size, process_count)

  spec = _catalogue.dataset_spec(cfg.name)
  train_names = _splits.split_names(cfg.train_split)
  eval_names = _splits.split_names(cfg.eval_split) if cfg.eval_split else []
  num_threads = cfg.num_threads or min(16, os.cpu_count() or 1)
  if _use_streaming(cfg, spec):
    return _stream_datasets(
        cfg, spec, train_names, eval_names, global_batch_size=global_batch_size,
        eval_batch_size=eval_batch_size, seed=seed,
        process_index=process_index, process_count=process_count)
  data = _sources.load(cfg.source, cfg.name, cfg.data_dir,
                       list(dict.fromkeys(train_names + eval_names)),
                       cache_dir=cfg.cache_dir, num_threads=num_threads,
                       download=cfg.download)
  sizes = {s: len(r) for s, r in data.splits.items()}
  train_records = _records.select(
      data.splits, _splits.resolve_split(cfg.train_split, sizes))
  eval_records = (_records.select(
      data.splits, _splits.resolve_split(cfg.eval_split, sizes))
                  if cfg.eval_split else None)

  if spec.num_classes is not None and data.num_classes != spec.num_classes:
    raise ValueError(
        f'{cfg.name} has {spec.num_classes} classes but {data.location} has '
        f'{data.num_classes} ({", ".join(data.class_names[:20])}); fix the '
        f'data or use another data.name.')
  native = train_records.image_shape
  if native is None and spec.crop == 'pad_crop':
    native = spec.image_shape or np.asarray(
        train_records.read(np.arange(1))[0][0]).shape
  if spec.crop == 'resized_crop':
    size = cfg.image_size or 224
    image_shape, pad = (size, size, 3), 0
  else:
    image_shape = tuple(int(d) for d in native)
    if spec.image_shape is not None and image_shape != spec.image_shape:
      raise ValueError(f'{cfg.name} images are {spec.image_shape} but '
                       f'{data.location} holds {image_shape} images.')
    if cfg.image_size and cfg.image_size != image_shape[0]:
      raise ValueError(
          f'data.image_size={cfg.image_size} but {cfg.name} images are '
          f'{image_shape}; image_size only resizes datasets of varying size '
          f'(imagenet2012); set it to 0.')
    pad = max(1, image_shape[0] // 8)  # 4 for 32x32, as in CIFAR training.
    eval_shape = None if eval_records is None else eval_records.image_shape
    if eval_shape is not None and tuple(eval_shape) != image_shape:
      raise ValueError(
          f'Evaluation split {cfg.eval_split!r} has images of shape '
          f'{tuple(eval_shape)} but training split {cfg.train_split!r} has '
          f'{image_shape}; both need one size.')
  channels = image_shape[-1]
  mean = tuple(cfg.mean) or spec.mean or (_catalogue.DEFAULT_MEAN,) * channels
  std = tuple(cfg.std) or spec.std or (_catalogue.DEFAULT_STD,) * channels
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f'data.mean={mean} / data.std={std} need {channels} '
                     f'values, one per channel.')
  mode = spec.augment if cfg.augment == 'auto' else cfg.augment
  if mode == 'device' and spec.crop != 'pad_crop':
    raise ValueError(
        f"augment='device' does pad-crop on fixed-size images; {cfg.name} "
        f"images differ in size, use augment='host' (or 'none').")

  def transform(train):
    return _iterators.HostTransform(
        crop=spec.crop, train=train, augment=mode, image_size=image_shape[0],
        pad=pad, crop_fraction=cfg.eval_crop_fraction,
        num_threads=num_threads, pad_mode=spec.pad_mode)

  train = _iterators.TrainData(
      train_records, global_batch_size=global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count,
      transform=transform(True), prefetch=cfg.prefetch,
      split=cfg.train_split)
  evals = None
  if eval_records is not None:
    evals = _iterators.EvalData(
        eval_records, global_batch_size=eval_batch_size,
        process_index=process_index, process_count=process_count,
        transform=transform(False), image_shape=image_shape,
        prefetch=cfg.prefetch)
  info = DatasetInfo(
      name=cfg.name, source=data.source, num_classes=data.num_classes,
      image_shape=image_shape, num_train=len(train_records),
      num_eval=0 if eval_records is None else len(eval_records),
      mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
      augment=mode, crop_padding=pad, pad_mode=spec.pad_mode,
      class_names=data.class_names)
  return train, evals, info


def _use_streaming(cfg, spec) -> bool:
  if cfg.pipeline != 'auto':
    return cfg.pipeline == 'stream'
  if cfg.source == 'shards':
    return True
  if cfg.data_dir and os.path.isfile(os.path.join(
      os.path.expanduser(cfg.data_dir), _streaming.SHARDS_META)):
    return True
  # Datasets of varying image size (ImageNet) never fit in memory.
  return spec.crop == 'resized_crop'


def _stream_datasets(cfg, spec, train_names, eval_names, *, global_batch_size,
                     eval_batch_size, seed, process_index, process_count):
  """get_datasets for data.pipeline='stream' (see data/streaming.py)."""
  mode = spec.augment if cfg.augment == 'auto' else cfg.augment
  if mode == 'device':
    mode = 'host'  # Streamed images differ in size: the crop is on the host.
    if cfg.augment == 'device':
      raise ValueError(
          "augment='device' pads and crops fixed-size images in the step; "
          "streamed images are cropped on the host: use augment='host' (or "
          "'none', or data.pipeline='memory' for small fixed-size data).")
  try:
    kind, location, splits, class_names = _streaming.open_splits(
        cfg.source, cfg.name, cfg.data_dir,
        list(dict.fromkeys(train_names + eval_names)))
  except DataNotFoundError as e:
    raise DataNotFoundError(f'{e}\nTo provide it: {spec.how_to}') from None
  if spec.num_classes is not None and len(class_names) != spec.num_classes:
    raise ValueError(
        f'{cfg.name} has {spec.num_classes} classes but {location} has '
        f'{len(class_names)} ({", ".join(class_names[:20])}); fix the data '
        f'or use another data.name.')
  sizes = {s: len(r) for s, r in splits.items()}

  def select(split):
    return _streaming.Selection([
        (splits[s], a, b) for s, a, b in _splits.resolve_split(split, sizes)])

  size = cfg.image_size or 224
  channels = 3
  mean = tuple(cfg.mean) or spec.mean or (_catalogue.DEFAULT_MEAN,) * channels
  std = tuple(cfg.std) or spec.std or (_catalogue.DEFAULT_STD,) * channels
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f'data.mean={mean} / data.std={std} need {channels} '
                     f'values, one per channel.')
  workers = cfg.workers if cfg.workers >= 0 else _streaming.default_workers()

  def builder(train, records):
    return _streaming.Builder(
        records=records, size=size, crop_fraction=cfg.eval_crop_fraction,
        random=train and mode == 'host', on_corrupt=cfg.on_corrupt, seed=seed)

  train_records = select(cfg.train_split)
  b = builder(True, train_records)
  train = _streaming.StreamTrainData(
      train_records, global_batch_size=global_batch_size, seed=seed,
      process_index=process_index, process_count=process_count, builder=b,
      workers=workers, prefetch=cfg.prefetch, split=cfg.train_split)
  evals = None
  if cfg.eval_split:
    eval_records = select(cfg.eval_split)
    b = builder(False, eval_records)
    evals = _streaming.StreamEvalData(
        eval_records, global_batch_size=eval_batch_size,
        process_index=process_index, process_count=process_count, builder=b,
        workers=workers, prefetch=cfg.prefetch)
  info = DatasetInfo(
      name=cfg.name, source=kind, num_classes=len(class_names),
      image_shape=(size, size, channels), num_train=len(train_records),
      num_eval=0 if evals is None else evals.num_examples,
      mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
      augment=mode, crop_padding=0, class_names=class_names)
  return train, evals, info


def to_global_array(batch, sharding):
  """Process-local numpy batch -> global ``jax.Array`` s split over ``sharding``.

  Every process passes its own batch; the leading (batch) axis of the result
  is the concatenation over processes, in process order.

  Args:
    batch: a pytree of process-local arrays (a batch from the iterators).
    sharding: e.g. ``NamedSharding(mesh, PartitionSpec('data'))``.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
