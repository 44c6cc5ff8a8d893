"""Tests of cmim_jax.input_pipeline on tiny data made in tmp_path.

Every image made here is filled with one value, its id, so that a batch can
be traced back to the examples it holds.
"""

import os
import pickle
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from cmim_jax import default_config
from cmim_jax import input_pipeline as ip
from cmim_jax.data import catalogue
from cmim_jax.data.loaders import cifar_archive
from cmim_jax.data.loaders import digits
from cmim_jax.data.loaders import folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fresh_cache():
  ip.clear_cache()
  yield
  ip.clear_cache()


def make_folder(root, split='train', counts=None, size=(6, 6), start_id=0,
                ext='png'):
  """Writes root/split/<class>/<i>.png; image pixel value = its id (< 256)."""
  counts = counts or {'cat': 4, 'ant': 3, 'dog': 5}
  next_id = start_id
  for cls, n in counts.items():
    os.makedirs(os.path.join(root, split, cls), exist_ok=True)
    for i in range(n):
      image = np.full(size + (3,), next_id, np.uint8)
      Image.fromarray(image).save(os.path.join(root, split, cls,
                                               f'{i:03d}.{ext}'))
      next_id += 1
  return next_id


def make_tar(src_root, tar_path, arcname='.'):
  with tarfile.open(tar_path, 'w:gz') as tf:
    tf.add(src_root, arcname=arcname)
  return str(tar_path)


def data_config(**overrides):
  c = default_config.data_config()
  c.prefetch = 0
  c.update(overrides)
  return c


def folder_config(root, **overrides):
  kw = dict(name='tiny', source='folder', data_dir=str(root),
            train_split='train', eval_split='train')
  kw.update(overrides)
  return data_config(**kw)


ORDER40 = folder.folder_order(40)  # Row i of numbered_folder is image ORDER40[i].


def ids(batch):
  """The id of each image of a batch (all its pixels hold it)."""
  return batch['image'][:, 0, 0, 0].astype(int)


@pytest.fixture
def tiny_folder(tmp_path):
  make_folder(tmp_path / 'data')
  return tmp_path / 'data'


@pytest.fixture
def numbered_folder(tmp_path):
  """40 train images, one class per 10, ids 0..39 in sorted order."""
  make_folder(tmp_path / 'num', counts={f'c{i}': 10 for i in range(4)})
  return tmp_path / 'num'


# -------------------------------------------------------------------- config


def test_default_config_data_section_has_exactly_the_data_keys():
  assert sorted(default_config.data_config()) == sorted(ip.DATA_KEYS)
  assert sorted(default_config.get_config().data) == sorted(ip.DATA_KEYS)
  assert len(set(ip.DATA_KEYS)) == len(ip.DATA_KEYS)
  c = ip.get_config()  # The earlier API: the same section, locked.
  assert c.to_dict() == default_config.data_config().to_dict()
  with pytest.raises(AttributeError):
    c.shuffle_bufer = 3  # A misspelt key fails loudly.


def test_every_data_key_is_read_by_get_datasets(tiny_folder):
  """Deleting any one key fails with a message naming it (no hidden default)."""
  full = dict(folder_config(tiny_folder))
  for key in ip.DATA_KEYS:
    partial = {k: v for k, v in full.items() if k != key}
    with pytest.raises(ValueError, match=rf"missing \['{key}'\]"):
      ip.get_datasets(partial, global_batch_size=4, seed=0)


def test_unknown_key_in_data_config_fails(tiny_folder):
  with pytest.raises(ValueError, match=r"unknown \['batchsize'\]"):
    ip.get_datasets(dict(folder_config(tiny_folder), batchsize=3),
                    global_batch_size=4, seed=0)


def test_importing_the_pipeline_does_not_import_tfds():
  code = ('import sys, cmim_jax.input_pipeline; '
          'print("tensorflow_datasets" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO)).stdout
  assert out.strip() == 'False'


# -------------------------------------------------------------------- folder


def test_folder_labels_follow_sorted_class_names(tiny_folder):
  train, evals, info = ip.get_datasets(folder_config(tiny_folder),
                                       global_batch_size=4, seed=0)
  assert info.class_names == ('ant', 'cat', 'dog')
  assert (info.num_classes, info.num_train, info.num_eval) == (3, 12, 12)
  assert info.image_shape == (6, 6, 3) and info.source == 'folder'
  assert info.mean == (0.5,) * 3  # A custom name gets the 0.5 default.
  batch = next(evals.iterator())
  # make_folder wrote cat (ids 0-3), ant (4-6), dog (7-11): sorted, ant first,
  # then rows in the fixed folder order.
  listing = np.array([4, 5, 6, 0, 1, 2, 3, 7, 8, 9, 10, 11])
  labels = np.array([0] * 3 + [1] * 4 + [2] * 5)
  order = folder.folder_order(12)[:4]
  np.testing.assert_array_equal(ids(batch), listing[order])
  np.testing.assert_array_equal(batch['label'], labels[order])
  assert batch['image'].dtype == np.uint8 and batch['label'].dtype == np.int32


def test_folder_tar_equals_folder(tiny_folder, tmp_path):
  tar = make_tar(tiny_folder, tmp_path / 'tiny.tar.gz')
  a = ip.get_datasets(folder_config(tiny_folder), global_batch_size=4,
                      seed=1)
  ip.clear_cache()
  b = ip.get_datasets(folder_config(tar), global_batch_size=4, seed=1)
  assert a[2] == b[2]
  for x, y in zip(a[1].iterator(), b[1].iterator()):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  np.testing.assert_array_equal(a[0].get_batch(3)['image'],
                                b[0].get_batch(3)['image'])


def test_folder_tar_with_prefix_and_jpeg(tmp_path):
  make_folder(tmp_path / 'd', ext='JPEG', size=(8, 8))
  tar = make_tar(tmp_path / 'd', tmp_path / 'x.tgz', arcname='top/level')
  _, evals, info = ip.get_datasets(folder_config(tar), global_batch_size=4,
                                   seed=0)
  assert info.num_train == 12 and info.image_shape == (8, 8, 3)


def test_folder_cache_dir_skips_decoding(tiny_folder, tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  cfg = folder_config(tiny_folder, cache_dir=str(cache))
  first = ip.get_datasets(cfg, global_batch_size=4, seed=0)
  assert sorted(p.suffix for p in cache.iterdir()) == ['.json', '.npy', '.npy']
  ip.clear_cache()

  def no_decoding(*args):
    raise AssertionError('decoded again despite the cache')

  monkeypatch.setattr(folder, 'decode_image', no_decoding)
  second = ip.get_datasets(cfg, global_batch_size=4, seed=0)
  np.testing.assert_array_equal(first[0].get_batch(2)['image'],
                                second[0].get_batch(2)['image'])
  # The memory cache serves the next call without the disk.
  for p in cache.iterdir():
    p.unlink()
  ip.get_datasets(cfg, global_batch_size=4, seed=0)


def test_cifar_archive_with_empty_data_dir_reads_the_data_cache(
    tmp_path, monkeypatch):
  _write_cifar(str(tmp_path / 'cache'), 'cifar10', {'train': 4, 'test': 6},
               10)
  monkeypatch.setenv('CMIM_JAX_DATA', str(tmp_path / 'cache'))
  assert cifar_archive.cache_dir() == str(tmp_path / 'cache')
  cfg = data_config(name='cifar10', source='cifar_archive', data_dir='')
  _, _, info = ip.get_datasets(cfg, global_batch_size=4, seed=0)
  assert (info.num_train, info.num_eval) == (20, 6)
  monkeypatch.setenv('CMIM_JAX_DATA', str(tmp_path / 'empty'))
  with pytest.raises(FileNotFoundError, match='CMIM_JAX_DATA'):
    ip.get_datasets(cfg, global_batch_size=4, seed=0)
  monkeypatch.delenv('CMIM_JAX_DATA')
  assert cifar_archive.cache_dir() == os.path.expanduser('~/.cache/cmim_jax')


def test_eval_split_of_another_size(tmp_path):
  make_folder(tmp_path, 'train')
  make_folder(tmp_path, 'test', size=(5, 5))
  with pytest.raises(ValueError, match=r"'test' has images of shape "
                     r'\(5, 5, 3\)'):
    ip.get_datasets(folder_config(tmp_path, eval_split='test'),
                    global_batch_size=4, seed=0)


def test_folder_union_of_classes_over_splits(tmp_path):
  make_folder(tmp_path, 'train', counts={'a': 2, 'b': 2})
  make_folder(tmp_path, 'val', counts={'b': 1, 'c': 1}, start_id=10)
  _, evals, info = ip.get_datasets(
      folder_config(tmp_path, eval_split='val'), global_batch_size=2, seed=0)
  assert info.class_names == ('a', 'b', 'c')
  np.testing.assert_array_equal(next(evals.iterator())['label'], [1, 2])


# ---------------------------------------------------------------- archives


def _write_cifar(root, name, sizes, label_range, bad_labels=False):
  """A tiny python-pickle CIFAR archive folder; image pixel = its id."""
  if name == 'cifar10':
    folder, files, key = 'cifar-10-batches-py', {
        'train': [f'data_batch_{i}' for i in range(1, 6)],
        'test': ['test_batch']}, b'labels'
  else:
    folder, files, key = 'cifar-100-python', {
        'train': ['train'], 'test': ['test']}, b'fine_labels'
  os.makedirs(os.path.join(root, folder))
  next_id = 0
  for split, names in files.items():
    for f in names:
      n = sizes[split]
      data = np.repeat(np.arange(next_id, next_id + n, dtype=np.uint8)[:, None],
                       3072, axis=1)
      data[:, 1024:2048] = 200  # Green plane: checks the CHW -> HWC layout.
      labels = [(next_id + i) % label_range for i in range(n)]
      if bad_labels:
        labels[-1] = label_range
      with open(os.path.join(root, folder, f), 'wb') as fh:
        pickle.dump({b'data': data, key: labels}, fh)
      next_id += n
  return os.path.join(root, folder)


@pytest.mark.parametrize('name,classes', [('cifar10', 10), ('cifar100', 100)])
@pytest.mark.parametrize('packed', [False, True])
def test_cifar_archive(tmp_path, name, classes, packed):
  folder = _write_cifar(str(tmp_path / 'raw'), name,
                        {'train': 4 if name == 'cifar10' else 20, 'test': 6},
                        classes)
  data_dir = str(tmp_path / 'raw')
  if packed:
    tarname = ('cifar-10-python.tar.gz' if name == 'cifar10'
               else 'cifar-100-python.tar.gz')
    data_dir = make_tar(folder, tmp_path / tarname,
                        arcname=os.path.basename(folder))
  cfg = data_config(name=name, source='cifar_archive', data_dir=data_dir)
  train, evals, info = ip.get_datasets(cfg, global_batch_size=4, seed=0)
  assert (info.num_train, info.num_eval, info.num_classes) == (20, 6, classes)
  batch = next(evals.iterator())
  np.testing.assert_array_equal(ids(batch), [20, 21, 22, 23])
  np.testing.assert_array_equal(batch['image'][0, 5, 7], [20, 200, 20])
  np.testing.assert_array_equal(batch['label'], np.arange(20, 24) % classes)


def test_auto_finds_archive_then_folder(tmp_path):
  _write_cifar(str(tmp_path), 'cifar10', {'train': 4, 'test': 6}, 10)
  cfg = data_config(name='cifar10', data_dir=str(tmp_path))
  _, _, info = ip.get_datasets(cfg, global_batch_size=4, seed=0)
  assert info.source == 'cifar_archive'
  cfg = folder_config(tmp_path / 'f', source='auto')
  make_folder(tmp_path / 'f')
  assert ip.get_datasets(cfg, global_batch_size=4, seed=0)[2].source == (
      'folder')


def test_auto_lists_every_place_it_looked(tmp_path):
  cfg = data_config(name='cifar10', data_dir=str(tmp_path / 'nothing'))
  with pytest.raises(FileNotFoundError) as e:
    ip.get_datasets(cfg, global_batch_size=4, seed=0)
  msg = str(e.value)
  for part in ('tfds:', 'cifar_archive:', 'folder:', 'cifar-10-batches-py',
               'To provide it', 'download: off',
               'python -m cmim_jax.data.download cifar10'):
    assert part in msg, (part, msg)
  assert 'tfds build' not in msg  # needs TensorFlow, which the package does not install


# -------------------------------------------------------------------- digits


def test_digits_partition_and_stats():
  cfg = data_config(name='digits', source='digits')
  train, evals, info = ip.get_datasets(cfg, global_batch_size=100, seed=0)
  assert (info.num_train, info.num_eval) == (1500, 297)
  assert info.image_shape == (8, 8, 1) and info.augment == 'none'
  assert info.crop_padding == 1
  data = digits.load('digits', '', ['train', 'test'])
  tr, te = data.splits['train'].images, data.splits['test'].images
  assert tr.max() == 255 and tr.min() == 0
  x = tr / 255.0
  np.testing.assert_allclose(info.mean, [x.mean()], atol=1e-4)
  np.testing.assert_allclose(info.std, [x.std()], atol=1e-4)
  # The documented partition: a default_rng(0) permutation, 1500 | 297.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  raw = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
  perm = np.random.default_rng(0).permutation(1797)
  np.testing.assert_array_equal(tr[..., 0], raw[perm[:1500]])
  np.testing.assert_array_equal(te[..., 0], raw[perm[1500:]])
  auto = ip.get_datasets(data_config(name='digits'), global_batch_size=100,
                         seed=0)
  np.testing.assert_array_equal(auto[0].get_batch(0)['image'],
                                train.get_batch(0)['image'])


# -------------------------------------------------------------------- splits

SPLIT_FORMS = [
    ('train', 0, 40), ('train[:30]', 0, 30), ('train[30:]', 30, 40),
    ('train[:90%]', 0, 36), ('train[10%:20%]', 4, 8), ('train[-5:]', 35, 40),
    ('train[5:-5]', 5, 35),
]


@pytest.mark.parametrize('split,start,stop', SPLIT_FORMS)
def test_split_forms_select_the_same_rows_as_tfds(numbered_folder, split,
                                                  start, stop):
  _, evals, info = ip.get_datasets(
      folder_config(numbered_folder, eval_split=split), global_batch_size=4,
      eval_batch_size=8, seed=0)
  got = np.concatenate([ids(b)[b['mask'] > 0] for b in evals.iterator()])
  np.testing.assert_array_equal(got, ORDER40[start:stop])
  assert info.num_eval == stop - start


def test_split_addition(tmp_path):
  make_folder(tmp_path, 'train', counts={'a': 3})
  make_folder(tmp_path, 'test', counts={'a': 3}, start_id=50)
  _, evals, _ = ip.get_datasets(
      folder_config(tmp_path, eval_split='train[:1]+test[1:]'),
      global_batch_size=2, seed=0)
  got = np.concatenate([ids(b)[b['mask'] > 0] for b in evals.iterator()])
  order = folder.folder_order(3)
  np.testing.assert_array_equal(got, [order[0], 50 + order[1], 50 + order[2]])


def test_train_and_eval_slices_are_disjoint(numbered_folder):
  train, evals, _ = ip.get_datasets(
      folder_config(numbered_folder, train_split='train[:75%]',
                    eval_split='train[75%:]'), global_batch_size=6, seed=0)
  seen = np.concatenate([ids(train.get_batch(s))
                         for s in range(train.steps_per_epoch)])
  assert set(seen) == set(ORDER40[:30]) and len(seen) == 30
  held = np.concatenate([ids(b)[b['mask'] > 0] for b in evals.iterator()])
  np.testing.assert_array_equal(held, ORDER40[30:])


# ---------------------------------------------------------------- iteration


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_eval_sees_every_example_once(numbered_folder, process_count):
  batches = []
  for p in range(process_count):
    _, evals, _ = ip.get_datasets(
        folder_config(numbered_folder, eval_split='train[:37]'),
        global_batch_size=4, eval_batch_size=12, seed=0, process_index=p,
        process_count=process_count)
    batches.append(list(evals.iterator()))
    assert evals.num_batches == 4  # ceil(37 / 12), the same on every process.
    assert all(b['image'].shape[0] == 12 // process_count
               for b in batches[-1])
  real = np.concatenate([ids(b)[b['mask'] == 1] for bs in batches for b in bs])
  np.testing.assert_array_equal(np.sort(real), np.sort(ORDER40[:37]))
  pads = np.concatenate([b['mask'] for bs in batches for b in bs])
  assert pads.sum() == 37 and set(np.unique(pads)) <= {0.0, 1.0}
  assert all(b['mask'].dtype == np.float32 for bs in batches for b in bs)


def test_training_batches_are_a_function_of_seed_and_step(numbered_folder):
  make = lambda seed: ip.get_datasets(folder_config(numbered_folder),
                                      global_batch_size=6, seed=seed)[0]
  a, b, c = make(0), make(0), make(1)
  assert a.steps_per_epoch == 6  # 40 // 6; 4 examples left out per epoch.
  for step in (0, 5, 6, 13):
    np.testing.assert_array_equal(a.get_batch(step)['image'],
                                  b.get_batch(step)['image'])
  assert any(not np.array_equal(a.get_batch(s)['label'],
                                c.get_batch(s)['label']) for s in range(3))
  # One epoch never repeats an example; the next epoch reshuffles.
  epoch0 = np.concatenate([ids(a.get_batch(s)) for s in range(6)])
  epoch1 = np.concatenate([ids(a.get_batch(s)) for s in range(6, 12)])
  assert len(set(epoch0)) == 36 and len(set(epoch1)) == 36
  assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize('augment', ['device', 'host'])
def test_resume_equals_continued_iteration(numbered_folder, augment):
  cfg = folder_config(numbered_folder, augment=augment, prefetch=2)
  train, _, _ = ip.get_datasets(cfg, global_batch_size=6, seed=3)
  straight = list(train.iterator(0, num_steps=15))
  train2, _, _ = ip.get_datasets(cfg, global_batch_size=6, seed=3)
  resumed = list(train2.iterator(start_step=9, num_steps=6))
  for x, y in zip(straight[9:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


@pytest.mark.parametrize('augment', ['device', 'host'])
def test_process_shards_are_disjoint_and_make_the_global_batch(
    numbered_folder, augment):
  cfg = folder_config(numbered_folder, augment=augment)
  whole = ip.get_datasets(cfg, global_batch_size=8, seed=5)[0]
  shards = [ip.get_datasets(cfg, global_batch_size=8, seed=5,
                            process_index=p, process_count=4)[0]
            for p in range(4)]
  assert shards[0].local_batch_size == 2
  assert shards[0].steps_per_epoch == whole.steps_per_epoch == 5
  for step in range(7):
    local = [s.get_batch(step) for s in shards]
    rows = [s.indices(step) for s in shards]
    assert len(set(np.concatenate(rows))) == 8  # Disjoint.
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([b[key] for b in local]), whole.get_batch(step)[key])
  epoch = np.concatenate([s.indices(st) for st in range(5) for s in shards])
  assert len(set(epoch)) == 40  # An epoch covers the 40 rows once.


def test_host_augmentation_is_a_padded_window(numbered_folder):
  cfg = folder_config(numbered_folder, augment='host')
  train, _, info = ip.get_datasets(cfg, global_batch_size=8, seed=0)
  assert info.crop_padding == 1  # 6x6 images: pad 6 // 8 -> at least 1.
  plain = ip.get_datasets(folder_config(numbered_folder, augment='none'),
                          global_batch_size=8, seed=0)[0]
  for step in range(3):
    aug, raw = train.get_batch(step)['image'], plain.get_batch(step)['image']
    np.testing.assert_array_equal(train.get_batch(step)['image'], aug)
    # Each image is constant, so a window keeps its value or shows padding 0.
    assert all(set(np.unique(a)) <= {0, r[0, 0, 0]} for a, r in zip(aug, raw))


def test_prefetch_matches_and_propagates_errors(numbered_folder):
  cfg = folder_config(numbered_folder, prefetch=3)
  train = ip.get_datasets(cfg, global_batch_size=4, seed=0)[0]
  got = list(train.iterator(2, num_steps=5))
  for step, batch in enumerate(got, start=2):
    np.testing.assert_array_equal(batch['image'],
                                  train.get_batch(step)['image'])

  def broken():
    yield 1
    raise RuntimeError('boom')

  it = ip._iterators.prefetch(broken(), 2)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_to_global_array_on_a_mesh(numbered_folder):
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      'data'))
  train = ip.get_datasets(folder_config(numbered_folder),
                          global_batch_size=len(devices) * 2, seed=0)[0]
  local = train.get_batch(0)
  glob = ip.to_global_array(local, sharding)
  assert glob['image'].shape == local['image'].shape
  assert glob['image'].sharding == sharding
  np.testing.assert_array_equal(np.asarray(glob['label']), local['label'])


# ---------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither a folder'):
    ip.get_datasets(folder_config(tmp_path / 'nope'), global_batch_size=2,
                    seed=0)


def test_missing_split_folder(tiny_folder):
  with pytest.raises(FileNotFoundError, match=r"no split folder .*val.*"
                     r"\['train'\]"):
    ip.get_datasets(folder_config(tiny_folder, eval_split='val'),
                    global_batch_size=2, seed=0)


def test_empty_class_folder(tiny_folder, tmp_path):
  os.makedirs(tiny_folder / 'train' / 'zebra')
  with pytest.raises(ValueError, match=r'zebra is empty'):
    ip.get_datasets(folder_config(tiny_folder), global_batch_size=2, seed=0)
  tar = make_tar(tiny_folder, tmp_path / 'e.tar.gz')
  with pytest.raises(ValueError, match=r"\['zebra'\].*empty"):
    ip.get_datasets(folder_config(tar), global_batch_size=2, seed=0)


def test_corrupt_image_names_the_file(tiny_folder, tmp_path):
  bad = tiny_folder / 'train' / 'dog' / '002.png'
  bad.write_bytes(bad.read_bytes()[:40])  # Truncated.
  with pytest.raises(ValueError, match=r'Cannot decode image .*dog/002\.png'):
    ip.get_datasets(folder_config(tiny_folder), global_batch_size=2, seed=0)
  tar = make_tar(tiny_folder, tmp_path / 'c.tar.gz')
  ip.clear_cache()
  with pytest.raises(ValueError, match=r'c\.tar\.gz:\./train/dog/002\.png'):
    ip.get_datasets(folder_config(tar), global_batch_size=2, seed=0)
  (tiny_folder / 'train' / 'dog' / '002.png').write_bytes(b'not an image')
  with pytest.raises(ValueError, match=r'dog/002\.png'):
    ip.get_datasets(folder_config(tiny_folder), global_batch_size=2, seed=0)


def test_mismatched_image_sizes_name_file_and_sizes(tiny_folder):
  odd = tiny_folder / 'train' / 'dog' / '001.png'
  Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(odd)
  with pytest.raises(ValueError, match=r'dog/001\.png has size 9x7 .* but '
                     r'.*ant/000\.png has 6x6'):
    ip.get_datasets(folder_config(tiny_folder), global_batch_size=2, seed=0)


@pytest.mark.parametrize('split', ['train[', 'train[1]', 'train[a:b]', 'all',
                                   'tr ain'])
def test_unparseable_split(tiny_folder, split):
  with pytest.raises(ValueError) as e:
    ip.get_datasets(folder_config(tiny_folder, train_split=split),
                    global_batch_size=2, seed=0)
  assert repr(split) in str(e.value) or 'all' in str(e.value)
  assert "'train[10%:20%]'" in str(e.value) or 'all' in str(e.value)


@pytest.mark.parametrize('split,match', [
    ('train[:99]', 'incompatible with 12'), ('train[5:5]', 'no examples')])
def test_split_outside_the_data(tiny_folder, split, match):
  with pytest.raises(ValueError, match=match):
    ip.get_datasets(folder_config(tiny_folder, eval_split=split),
                    global_batch_size=2, seed=0)


def test_archive_labels_out_of_range(tmp_path):
  _write_cifar(str(tmp_path), 'cifar10', {'train': 4, 'test': 6}, 10,
               bad_labels=True)
  cfg = data_config(name='cifar10', source='cifar_archive',
                    data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'data_batch_1: labels out of range '
                     r'\[0, 10\): found 0\.\.10'):
    ip.get_datasets(cfg, global_batch_size=4, seed=0)


def test_archive_with_wrong_data_shape(tmp_path):
  folder = _write_cifar(str(tmp_path), 'cifar10', {'train': 4, 'test': 6}, 10)
  with open(os.path.join(folder, 'test_batch'), 'wb') as fh:
    pickle.dump({b'data': np.zeros((6, 100), np.uint8), b'labels': [0] * 6},
                fh)
  cfg = data_config(name='cifar10', source='cifar_archive', data_dir=folder)
  with pytest.raises(ValueError, match=r'test_batch.*expected uint8'):
    ip.get_datasets(cfg, global_batch_size=4, seed=0)


def test_batch_not_divisible_by_process_count(tiny_folder):
  with pytest.raises(ValueError, match=r'global_batch_size=6 must be a '
                     r'positive multiple of process_count=4'):
    ip.get_datasets(folder_config(tiny_folder), global_batch_size=6, seed=0,
                    process_index=0, process_count=4)
  with pytest.raises(ValueError, match='eval_batch_size=3'):
    ip.get_datasets(folder_config(tiny_folder), global_batch_size=4,
                    eval_batch_size=3, seed=0, process_index=0,
                    process_count=2)


def test_split_smaller_than_one_batch(tiny_folder):
  with pytest.raises(ValueError, match=r"'train\[:3\]' has 3 examples, fewer "
                     r'than one global batch of 4'):
    ip.get_datasets(folder_config(tiny_folder, train_split='train[:3]'),
                    global_batch_size=4, seed=0)


def test_bad_config_values(tiny_folder):
  for key, value in (('source', 'tfrecords'), ('augment', 'gpu'), ('pipeline', 'fast'),
                     ('on_corrupt', 'ignore')):
    with pytest.raises(ValueError, match=f"data.{key}='{value}' is not one of \\("):
      ip.get_datasets(folder_config(tiny_folder, **{key: value}),
                      global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match='image_size'):
    ip.get_datasets(folder_config(tiny_folder, image_size=32),
                    global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match='one per channel'):
    ip.get_datasets(folder_config(tiny_folder, mean=(0.5,), std=(0.5,)),
                    global_batch_size=2, seed=0)


def test_known_dataset_with_wrong_class_count(tiny_folder):
  with pytest.raises(ValueError, match='cifar10 has 10 classes'):
    ip.get_datasets(folder_config(tiny_folder, name='cifar10'),
                    global_batch_size=2, seed=0)


# ------------------------------------------------------- the shared CIFAR-10


def _shared_cifar10():
  base = os.environ.get('CMIM_SHARED_DATA',
                        os.path.join(REPO, '..', 'shared', 'data'))
  path = os.path.join(base, 'cifar10-train.tar.gz')
  if not os.path.isfile(path):
    pytest.skip(f'{path} not present (set CMIM_SHARED_DATA to its folder).')
  return path


def test_shared_cifar10_folder_archive():
  path = _shared_cifar10()
  cfg = data_config(name='cifar10', source='folder', data_dir=path,
                    train_split='train[:45000]', eval_split='train')
  train, evals, info = ip.get_datasets(cfg, global_batch_size=128,
                                       eval_batch_size=1000, seed=0)
  assert (info.num_train, info.num_eval) == (45000, 50000)
  assert info.class_names == ('airplane', 'automobile', 'bird', 'cat', 'deer',
                              'dog', 'frog', 'horse', 'ship', 'truck')
  assert info.image_shape == (32, 32, 3) and info.augment == 'device'
  assert info.mean == catalogue.CIFAR10_MEAN
  labels = np.concatenate([b['label'] for b in evals.iterator()])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [5000] * 10)
  assert next(train.iterator())['image'].shape == (128, 32, 32, 3)
  # The README's validation split, train[45000:], holds every class.
  held = np.bincount(labels[45000:], minlength=10)
  assert held.sum() == 5000 and held.min() > 400, held
