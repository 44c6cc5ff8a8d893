"""The tfds source, driven by ``tfds.testing.mock_data`` (no TensorFlow).

``mock_data`` drives ``tfds.data_source`` without TensorFlow, so the
array_record path is tested end to end on random examples. The ``tfds.load``
fallback (data prepared as TFRecord) needs TensorFlow, which the test
environment does not have; only its error message is tested here.
"""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cmim_jax import default_config
from cmim_jax import input_pipeline as ip


def _config(**kw):
  c = default_config.data_config()
  c.prefetch = 0
  c.num_threads = 1
  # mock_data patches this process only, not Grain's worker processes.
  c.workers = 0
  c.update(kw)
  return c


def test_cifar10_through_data_source_with_slicing(tmp_path):
  with tfds.testing.mock_data(num_examples=30):
    cfg = _config(name='cifar10', source='tfds', data_dir=str(tmp_path),
                  train_split='train[:20]', eval_split='test[10%:]')
    train, evals, info = ip.get_datasets(cfg, global_batch_size=8,
                                         eval_batch_size=8, seed=0)
    assert (info.num_train, info.num_eval, info.num_classes) == (20, 27, 10)
    assert info.source == 'tfds' and info.image_shape == (32, 32, 3)
    assert train.steps_per_epoch == 2
    batch = train.get_batch(0)
    assert batch['image'].shape == (8, 32, 32, 3)
    assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int32
    # Eval order is the split's order: rows 3.. of 'test' (10% of 30 = 3).
    ds = tfds.data_source('cifar10', split='test', data_dir=str(tmp_path),
                          download=False)
    first = next(evals.iterator())
    for j in range(8):
      np.testing.assert_array_equal(first['image'][j], ds[3 + j]['image'])
      assert first['label'][j] == ds[3 + j]['label']
    total = sum(b['mask'].sum() for b in evals.iterator())
    assert total == 27 and evals.num_batches == 4


def test_auto_tries_tfds_first():
  with tfds.testing.mock_data(num_examples=10):
    _, _, info = ip.get_datasets(_config(name='cifar100'),
                                 global_batch_size=5, seed=0)
  assert info.source == 'tfds' and info.num_classes == 100
  assert info.mean == (0.5071, 0.4865, 0.4409)


def test_imagenet_host_crops_fixed_size(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    cfg = _config(name='imagenet2012', source='tfds', data_dir=str(tmp_path),
                  eval_split='validation', image_size=16, num_threads=2)
    train, evals, info = ip.get_datasets(cfg, global_batch_size=4, seed=0)
    assert info.augment == 'host' and info.image_shape == (16, 16, 3)
    assert info.crop_padding == 0 and info.num_classes == 1000
    a, b = train.get_batch(1), train.get_batch(1)
    assert a['image'].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(a['image'], b['image'])
    e = list(evals.iterator())
    assert [x['mask'].sum() for x in e] == [4, 2]
    assert e[1]['image'][2:].max() == 0  # Padding is zeros.
    with pytest.raises(ValueError, match="use augment='host'"):
      ip.get_datasets(_config(name='imagenet2012', source='tfds',
                              augment='device'),
                      global_batch_size=4, seed=0)


def test_tfds_not_prepared(tmp_path):
  cfg = _config(name='cifar10', source='tfds', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'(?s)not prepared.*To provide it: '
                     r'.*cifar-10-python.tar.gz'):
    ip.get_datasets(cfg, global_batch_size=4, seed=0)


def test_unknown_tfds_name_is_not_found(tmp_path):
  cfg = _config(name='no_such_dataset_xyz', source='tfds',
                data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='no dataset named'):
    ip.get_datasets(cfg, global_batch_size=4, seed=0)
