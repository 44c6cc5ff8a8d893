"""Exact resume mid-epoch on the streaming source, through the trainer.

The streaming iterator's whole state is the next step: a batch is a pure
function of (seed, step) (data/streaming.py), and the checkpoint holds the
step. So a run killed mid-epoch and resumed sees the same remaining batches
in the same order, here even with another number of worker processes.
CMIM draws its negatives from memory banks indexed by the streamed batches'
'index', so the banks (checkpointed too) must also come back identical.
"""

import json
import shutil

import numpy as np
import pytest

from cmim_jax import metric_writers
from cmim_jax import train
from configs import digits
from tests.test_data_stream import make_folder


def stream_run_config(root, workers):
  config = digits.get_config('smoke')
  config.data.name = 'toy'
  config.data.source = 'folder'
  config.data.data_dir = root
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.pipeline = 'stream'
  config.data.augment = 'host'
  config.data.image_size = 16
  config.data.workers = workers
  config.data.prefetch = 1
  config.batch_size = 8  # 33 images: 4 steps per epoch.
  config.eval_batch_size = 8
  config.num_train_steps = 6
  config.checkpoint_every_steps = 3
  config.eval_every_steps = 6
  config.keep_checkpoints = 5
  config.log_every_steps = 1
  config.cmim.embed_dim = 8
  config.cmim.negatives = 'memory'  # Needs batch['index'].
  config.cmim.num_negatives = 16
  config.model.stage_sizes = (1, 1, 1)
  config.optimizer = 'sgd'
  config.learning_rate = 0.1
  config.warmup_epochs = 0.0
  return config


@pytest.mark.slow  # Two short training runs (compiles twice).
@pytest.mark.multiprocess
def test_streaming_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
  root = make_folder(tmp_path / 'data', splits=(('train', 11), ('val', 3)))
  full, resumed = tmp_path / 'full', tmp_path / 'resumed'
  train.train_and_evaluate(stream_run_config(root, workers=0), str(full))
  shutil.copytree(full, resumed)
  # Killed after the checkpoint of step 3, mid-epoch (4 steps per epoch).
  shutil.rmtree(resumed / 'checkpoints' / '6')
  kept = [r for r in metric_writers.read_metrics(str(resumed)) if r['step'] <= 3]
  with open(resumed / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  # Resumed with Grain worker processes: the batches must not change.
  train.train_and_evaluate(stream_run_config(root, workers=2), str(resumed))
  a = [r for r in metric_writers.read_metrics(str(full)) if r['split'] == 'train']
  b = [r for r in metric_writers.read_metrics(str(resumed))
       if r['split'] == 'train']
  assert [r['step'] for r in a] == [r['step'] for r in b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(rb['loss'], ra['loss'], rtol=1e-6)
  ea = [r for r in metric_writers.read_metrics(str(full))
        if r['split'] == 'eval'][-1]
  eb = [r for r in metric_writers.read_metrics(str(resumed))
        if r['split'] == 'eval'][-1]
  assert ea['num_examples'] == eb['num_examples'] == 9
  assert ea['accuracy'] == eb['accuracy']
