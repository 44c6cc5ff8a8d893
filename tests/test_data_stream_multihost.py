"""Multi-host on the streaming source: 2 processes x 2 devices == 1 x 4.

Each process reads and decodes only its rows of every global batch
(``StreamTrainData.indices``), with per-example crops from (seed, epoch,
row); the global batch, and so the training, must not depend on the
process count.
"""

import os

import numpy as np
import pytest

from launch import local as local_launch
from tests.test_data_stream import make_folder
from tests.test_main import ROOT
from tests.test_main import records
from tests.test_main import run_main


def stream_args(data_dir):
  return ["--config", "configs/digits.py:smoke",
          "--config.num_train_steps=4", "--config.batch_size=8",
          "--config.eval_batch_size=8", "--config.log_every_steps=1",
          "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4",
          "--config.cmim.embed_dim=8", "--config.model.stage_sizes=(1,1,1)",
          "--config.data.name=toy", "--config.data.source=folder",
          f"--config.data.data_dir={data_dir}",
          "--config.data.train_split=train", "--config.data.eval_split=val",
          "--config.data.pipeline=stream", "--config.data.augment=host",
          "--config.data.image_size=16", "--config.data.workers=1"]


@pytest.mark.slow  # Three JAX processes each compile the step.
@pytest.mark.multiprocess
def test_two_processes_equal_one_process_streaming(tmp_path, capfd):
  data = make_folder(tmp_path / "data", splits=(("train", 6), ("val", 3)))
  one, two = tmp_path / "one", tmp_path / "two"
  r = run_main(*stream_args(data), "--workdir", str(one), devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    rc = local_launch.launch([*stream_args(data), "--workdir", str(two)],
                             num_processes=2, devices_per_process=2,
                             timeout=600)
  finally:
    os.chdir(cwd)
  assert rc == 0, capfd.readouterr().out[-3000:]
  a, b = records(one, "train"), records(two, "train")
  assert len(a) == len(b) == 4
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-5, atol=1e-6)
  ea, eb = records(one, "eval")[-1], records(two, "eval")[-1]
  assert ea["num_examples"] == eb["num_examples"] == 9
  np.testing.assert_allclose(eb["accuracy"], ea["accuracy"], atol=1e-6)
