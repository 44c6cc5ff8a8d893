"""Workdir paths: gs:// through epath (a mocked in-memory bucket), a clear error without gcsfs."""

import json
import os
import sys

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from cmim_jax import checkpointing
from cmim_jax import metric_writers
from cmim_jax import paths
from cmim_jax import runlock


class FakeGCS(MemoryFileSystem):
  """An in-memory stand-in for gcsfs: same protocol names, no network."""
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):
    del finalize_on_close  # gcsfs's argument, which etils passes
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return "/" + path.strip("/")

  def unstrip_protocol(self, name):
    return "gs://" + name.lstrip("/")


@pytest.fixture
def fake_bucket(monkeypatch):
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, FakeGCS)  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  FakeGCS.clear_instance_cache()
  yield FakeGCS.store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.resolve("runs/x")) == str(tmp_path / "runs" / "x")
  assert paths.scheme("runs/x") is None and paths.scheme("gs://b/x") == "gs"


def test_remote_workdir_without_gcsfs_names_the_cloud_extra(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  if paths._backend_available("gcs"):  # pylint: disable=protected-access
    pytest.skip("gcsfs (or TensorFlow) is installed here")
  with pytest.raises(paths.RemotePathError) as e:
    metric_writers.MetricWriter("gs://bucket/runs/x")
  assert "pip install 'cmim_jax[cloud]'" in str(e.value) and "gcsfs" in str(e.value)
  with pytest.raises(paths.RemotePathError):
    checkpointing.Checkpointer("gs://bucket/runs/x")
  assert os.listdir(tmp_path) == []  # no local directory called gs:


def test_unknown_scheme_is_refused():
  with pytest.raises(paths.RemotePathError, match="not supported"):
    paths.resolve("ftp://host/runs/x")


def test_metrics_and_tensorboard_go_to_the_bucket(fake_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  writer = metric_writers.MetricWriter("gs://bucket/runs/x")
  writer.write(1, "train", {"loss": np.float32(2.5)})
  writer.write(2, "train", {"loss": 1.5})
  writer.close()
  # A resumed run appends to what the first one left.
  writer = metric_writers.MetricWriter("gs://bucket/runs/x", tensorboard=False)
  writer.write(3, "eval", {"accuracy": 0.5})
  assert [json.loads(line)["step"] for line in
          fake_bucket["/bucket/runs/x/metrics.jsonl"].getvalue().decode().splitlines()] == [1, 2, 3]
  assert metric_writers.read_metrics("gs://bucket/runs/x")[0] == {
      "step": 1, "split": "train", "loss": 2.5}
  events = [k for k in fake_bucket if k.startswith("/bucket/runs/x/tb/events.out.tfevents")]
  assert len(events) == 1 and len(fake_bucket[events[0]].getvalue()) > 100
  assert os.listdir(tmp_path) == []


def test_checkpointer_hands_orbax_the_remote_directory(fake_bucket, monkeypatch):
  seen = {}

  class Recorder:
    def __init__(self, directory, options=None):
      seen["directory"] = directory

  monkeypatch.setattr(checkpointing.ocp, "CheckpointManager", Recorder)
  ckpt = checkpointing.Checkpointer("gs://bucket/runs/x")
  assert os.fspath(seen["directory"]) == "gs://bucket/runs/x/checkpoints"
  assert os.fspath(ckpt.damaged_directory) == "gs://bucket/runs/x/checkpoints.damaged"


def test_run_lock_on_the_bucket(fake_bucket):
  first = runlock.RunLock("gs://bucket/runs/x", heartbeat_s=0)
  first.acquire()
  assert json.loads(fake_bucket["/bucket/runs/x/RUNNING.lock"].getvalue())["pid"] == os.getpid()
  with pytest.raises(runlock.WorkdirLocked, match=f"pid {os.getpid()}"):
    runlock.RunLock("gs://bucket/runs/x", heartbeat_s=0).acquire()
  first.release()
  assert "/bucket/runs/x/RUNNING.lock" not in fake_bucket
