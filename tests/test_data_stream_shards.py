"""ArrayRecord shards: `python -m cmim_jax.data.convert` and reading them."""

import os

import numpy as np
import pytest

from cmim_jax import input_pipeline as ip
from cmim_jax.data import convert
from cmim_jax.data import streaming
from tests.test_data_stream import make_folder
from tests.test_data_stream import stream_config


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('src'),
                     splits=(('train', 7), ('val', 2)))


def test_shards_give_the_folder_batches(folder, tmp_path):
  dst = str(tmp_path / 'shards')
  assert convert.main([folder, dst, '--examples_per_shard', '5',
                       '--no_progress']) == 0
  meta = streaming.read_shards_meta(dst)
  assert meta['classes'] == ['ant', 'bee', 'cat']
  assert meta['splits']['train']['num_examples'] == 21
  assert len(meta['splits']['train']['shards']) == 5  # ceil(21 / 5)
  for source, pipeline in (('shards', 'stream'), ('auto', 'auto')):
    c = stream_config(dst, source=source, pipeline=pipeline)
    train, evals, info = ip.get_datasets(c, global_batch_size=6, seed=4)
    assert info.source == 'shards' and info.num_train == 21
  ref_train, ref_eval, _ = ip.get_datasets(stream_config(folder),
                                           global_batch_size=6, seed=4)
  for step in (0, 3, 7):
    a, b = train.get_batch(step), ref_train.get_batch(step)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  for a, b in zip(evals.iterator(), ref_eval.iterator()):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['mask'], b['mask'])


def test_convert_resumes_and_refuses_other_data(folder, tmp_path):
  dst = str(tmp_path / 'shards')
  convert.convert(folder, dst, ['train'], examples_per_shard=4,
                  progress=False)
  out = os.path.join(dst, 'train')
  names = convert.shard_names('train', 6)
  stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in names}
  # An interruption: the last shard never got renamed, a temporary remains.
  os.replace(os.path.join(out, names[-1]),
             os.path.join(out, names[-1] + '.123.tmp'))
  os.remove(os.path.join(out, names[2]))
  convert.convert(folder, dst, ['train'], examples_per_shard=4,
                  progress=False)
  for n in names:
    changed = os.stat(os.path.join(out, n)).st_mtime_ns != stamps[n]
    assert changed == (n in (names[2], names[-1])), n
  assert not [f for f in os.listdir(out) if f.endswith('.tmp')]
  train, _, _ = ip.get_datasets(stream_config(dst, source='auto', eval_split=''),
                                global_batch_size=7, seed=0)
  assert sorted(np.concatenate(
      [train.get_batch(s)['label'] for s in range(3)])) == [0] * 7 + [1] * 7 + [
          2] * 7
  with pytest.raises(ValueError, match='examples_per_shard did'):
    convert.convert(folder, dst, ['train'], examples_per_shard=5,
                    progress=False)


def test_damaged_shard_fails_its_checksum(folder, tmp_path):
  dst = str(tmp_path / 'shards')
  convert.convert(folder, dst, ['train', 'val'], examples_per_shard=100,
                  progress=False)
  path = os.path.join(dst, 'val', convert.shard_names('val', 1)[0])
  raw = bytearray(open(path, 'rb').read())
  # Flip bytes inside the stored image data of the first record (the
  # ArrayRecord container itself stores records uncompressed by default).
  at = raw.find(b'\xff\xd8\xff') + 200
  raw[at:at + 8] = bytes(255 - x for x in raw[at:at + 8])
  open(path, 'wb').write(bytes(raw))
  c = stream_config(dst, source='shards', train_split='val', eval_split='')
  train, _, _ = ip.get_datasets(c, global_batch_size=6, seed=0)
  with pytest.raises(streaming.CorruptImageError, match='shard is damaged'):
    for s in range(train.steps_per_epoch):
      train.get_batch(s)


def test_record_checksum_and_index():
  record = streaming.pack_record(7, 2, 'a/b.jpg', b'JPEGDATA')
  assert streaming.unpack_record(record, 'r') == (7, 2, 'a/b.jpg', b'JPEGDATA')
  bad = record[:-1] + b'X'
  with pytest.raises(streaming.CorruptImageError, match='checksum'):
    streaming.unpack_record(bad, 'r')
  with pytest.raises(streaming.CorruptImageError, match='not a cmim_jax'):
    streaming.unpack_record(b'tf.Example bytes', 'r')


def test_convert_errors(tmp_path):
  assert convert.main([str(tmp_path / 'nope'), str(tmp_path / 'out'),
                       '--no_progress']) == 1
  with pytest.raises(ValueError, match='examples_per_shard'):
    convert.convert(str(tmp_path), str(tmp_path / 'o'), examples_per_shard=0)
  with pytest.raises(ip.DataNotFoundError, match='convert'):
    ip.get_datasets(stream_config(tmp_path, source='shards'),
                    global_batch_size=2, seed=0)
