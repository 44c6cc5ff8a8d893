"""Streamed batches carry each example's row ('index'), as in-memory ones
do, and streams release Grain's shared memory (data/streaming.py)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from cmim_jax import input_pipeline as ip
from tests.test_data_stream import CLASSES, make_folder, stream_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def same_size_folder(root, per_class=5, side=24):
  """A folder the in-memory loader also reads (one image size)."""
  rng = np.random.default_rng(0)
  for split, n in (('train', per_class), ('val', 2)):
    for c in CLASSES:
      d = os.path.join(root, split, c)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(d, f'{i:03d}.png'))
  return str(root)


def test_streamed_index_is_the_in_memory_row(tmp_path):
  root = same_size_folder(tmp_path)
  mem, _, _ = ip.get_datasets(stream_config(root, pipeline='memory',
                                            image_size=24),
                              global_batch_size=4, seed=7)
  stream, evals, _ = ip.get_datasets(stream_config(root, image_size=24),
                                     global_batch_size=4, seed=7)
  assert stream.steps_per_epoch == mem.steps_per_epoch == 3
  seen = []
  for step in range(2 * stream.steps_per_epoch):  # Two epochs: two orders.
    s, m = stream.get_batch(step), mem.get_batch(step)
    assert s['index'].dtype == m['index'].dtype == np.int32
    np.testing.assert_array_equal(s['index'], m['index'])
    np.testing.assert_array_equal(s['label'], m['label'])
    np.testing.assert_array_equal(s['index'], stream.indices(step))
    seen.append(s['index'])
  # The label is the label of the row the index names.
  for row, label in zip(np.concatenate(seen),
                        np.concatenate([stream.get_batch(k)['label']
                                        for k in range(6)])):
    assert stream._records.fetch(int(row))[1] == label  # pylint: disable=protected-access
  # Each epoch reads 12 distinct rows of the 15.
  assert len(set(np.concatenate(seen[:3]))) == 12
  # Evaluation batches are as in memory: no index.
  assert set(evals.get_batch(0)) == {'image', 'label', 'mask'}


def test_skipped_example_index_names_the_substitute(tmp_path):
  root = make_folder(tmp_path, splits=(('train', 4), ('val', 1)))
  bad = os.path.join(root, 'train', 'bee', '002.jpg')
  with open(bad, 'wb') as fh:
    fh.write(b'not a jpeg')
  train, _, _ = ip.get_datasets(stream_config(root, on_corrupt='skip'),
                                global_batch_size=4, seed=0)
  records = train._records  # pylint: disable=protected-access
  n = len(records)
  bad_row = next(r for r in range(n) if records.fetch(r)[2] == bad)
  for step in range(train.steps_per_epoch):
    rows = train.indices(step)
    batch = train.get_batch(step)
    want = [(r + 1) % n if r == bad_row else r for r in rows]
    np.testing.assert_array_equal(batch['index'], want)
    np.testing.assert_array_equal(
        batch['label'], [records.fetch(int(r))[1] for r in want])
  assert train.corrupt_skipped == 1


_NO_CLOSE = """
import sys
sys.path.insert(0, {repo!r})
from tests.test_data_stream import make_folder, stream_config
from cmim_jax import input_pipeline as ip

def main():
  root = make_folder({root!r}, splits=(('train', 4), ('val', 3)))
  train, evals, _ = ip.get_datasets(
      stream_config(root, workers=2, prefetch=2), global_batch_size=6, seed=0)
  global KEPT
  it = train.iterator(0)  # Endless, never closed.
  KEPT = [next(it) for _ in range(3)] + list(evals.iterator())
  KEPT += list(train.iterator(0, num_steps=2))  # Finite, run to its end.
  print('batches', len(KEPT))

if __name__ == '__main__':
  main()
"""


@pytest.mark.multiprocess
def test_streams_left_open_leak_no_shared_memory(tmp_path):
  script = tmp_path / 'no_close.py'
  script.write_text(textwrap.dedent(_NO_CLOSE.format(
      repo=REPO, root=str(tmp_path / 'data'))))
  out = subprocess.run([sys.executable, str(script)], capture_output=True,
                       text=True, timeout=300, cwd=REPO, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'batches 7' in out.stdout
  assert 'leaked shared_memory' not in out.stderr, out.stderr[-3000:]
