"""A damaged latest checkpoint: fall back to the newest intact step, keep the damaged one aside."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import logging

from cmim_jax import checkpointing


def state(value):
  return {"w": np.full((300,), value, np.float32), "b": {"x": np.arange(10, dtype=np.float32) * value}}


TARGET = state(0.0)


def make_run(workdir, steps=(1, 2, 3)):
  ckpt = checkpointing.Checkpointer(str(workdir), keep=5)
  for s in steps:
    ckpt.save(s, state(float(s)))
  ckpt.close()


def truncate_data(step_dir):
  """Cuts every array data file short, as a full disk or an interrupted copy does."""
  cut = 0
  for root, _, files in os.walk(step_dir):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 3)
        cut += 1
  assert cut > 0


def truncate_metadata(step_dir):
  path = os.path.join(step_dir, "default", "_METADATA")
  with open(path, "rb") as f:
    head = f.read(50)
  with open(path, "wb") as f:
    f.write(head)


@pytest.fixture
def warnings_logged(monkeypatch):
  seen = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: seen.append(msg % a))
  return seen


@pytest.mark.parametrize("damage", [truncate_data, truncate_metadata])
def test_falls_back_to_newest_intact_step_and_keeps_damaged_aside(tmp_path, damage,
                                                                   warnings_logged):
  make_run(tmp_path)
  damage(str(tmp_path / "checkpoints" / "3"))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  restored = ckpt.restore(TARGET)
  np.testing.assert_array_equal(restored["w"], state(2.0)["w"])
  np.testing.assert_array_equal(restored["b"]["x"], state(2.0)["b"]["x"])
  assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
  assert os.listdir(tmp_path / "checkpoints.damaged") == ["3"]
  assert len(warnings_logged) == 1
  line = warnings_logged[0]
  assert "step 3" in line and "damaged" in line and "step 2" in line
  assert "checkpoints.damaged" in line and "\n" not in line
  # Training goes on from there: the next save of step 3 is a normal one.
  ckpt.save(3, state(30.0))
  ckpt.close()
  again = checkpointing.Checkpointer(str(tmp_path))
  np.testing.assert_array_equal(again.restore(TARGET)["w"], state(30.0)["w"])
  again.close()


def test_every_step_damaged_is_one_clear_error_and_nothing_moved(tmp_path):
  make_run(tmp_path, steps=(1, 2))
  for s in ("1", "2"):
    truncate_metadata(str(tmp_path / "checkpoints" / s))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore(TARGET)
  message = str(e.value)
  assert "\n" not in message and "step 2:" in message and "step 1:" in message
  assert "--workdir" in message
  assert ckpt.all_steps() == [1, 2] and not (tmp_path / "checkpoints.damaged").exists()
  ckpt.close()


def test_config_mismatch_is_not_called_damage(tmp_path):
  make_run(tmp_path, steps=(1, 2))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  other = {**TARGET, "new_layer": np.zeros((7,), np.float32)}  # a model grown since
  with pytest.raises(checkpointing.CheckpointError, match="config changed"):
    ckpt.restore(other)
  assert ckpt.all_steps() == [1, 2] and not (tmp_path / "checkpoints.damaged").exists()
  ckpt.close()


def test_explicit_damaged_step_names_the_others(tmp_path):
  make_run(tmp_path, steps=(1, 2))
  truncate_data(str(tmp_path / "checkpoints" / "2"))
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.CheckpointError, match=r"choose another of the steps \[1, 2\]"):
    ckpt.restore(TARGET, step=2)
  np.testing.assert_array_equal(ckpt.restore(TARGET, step=1)["w"], state(1.0)["w"])
  ckpt.close()


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from cmim_jax import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1])
    target = {"w": np.zeros((300,), np.float32), "b": {"x": np.zeros((10,), np.float32)}}
    print("restored", float(ckpt.restore(target)["w"][0]))
    ckpt.close()
""")


def test_damaged_restore_in_a_fresh_process_has_no_traceback(tmp_path):
  make_run(tmp_path)
  truncate_data(str(tmp_path / "checkpoints" / "3"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "restored 2.0" in r.stdout
  assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr
  assert "Checkpoint step 3" in r.stderr


EMPTY_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from cmim_jax import checkpointing
    try:
      checkpointing.Checkpointer(sys.argv[1]).restore({"w": np.zeros(3)})
    except FileNotFoundError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
""")


def test_no_checkpoint_exits_without_a_thread_traceback(tmp_path):
  """`--mode eval` on an empty workdir: the clear line, then nothing from orbax's threads."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", EMPTY_CHILD, str(tmp_path)], env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith("error: no checkpoint in "), r.stderr
  assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("damage", [truncate_data, truncate_metadata])
def test_restore_parts_reads_a_subtree_and_falls_back_read_only(tmp_path, damage,
                                                                warnings_logged):
  """What the packed export reads: some entries of the state, no target, and a
  damaged newest step skipped with a warning but left where it is."""
  make_run(tmp_path)
  damage(str(tmp_path / "checkpoints" / "3"))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)
  parts, step = ckpt.restore_parts(("b", "absent"))
  assert step == 2 and list(parts) == ["b"]  # "w" not read, "absent" left out
  assert isinstance(parts["b"]["x"], np.ndarray)
  np.testing.assert_array_equal(parts["b"]["x"], state(2.0)["b"]["x"])
  # (Orbax adds its own "Given directory is read only" notes.)
  ours = [w for w in warnings_logged if w.startswith("Checkpoint step")]
  assert len(ours) == 1
  line = ours[0]
  assert "step 3" in line and "damaged" in line and "step 2" in line and "left in place" in line
  # Read-only: the damaged step stays, nothing is moved aside or created.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert not (tmp_path / "checkpoints.damaged").exists()
  with pytest.raises(checkpointing.CheckpointError, match=r"step 3 .*does not restore"):
    ckpt.restore_parts(("w",), step=3)
  parts, step = ckpt.restore_parts(("w",), step=1)
  assert step == 1 and list(parts) == ["w"]
  np.testing.assert_array_equal(parts["w"], state(1.0)["w"])
  with pytest.raises(checkpointing.CheckpointError, match="has none of"):
    ckpt.restore_parts(("nothing",), step=1)
  with pytest.raises(ValueError, match="read-only"):
    ckpt.save(4, state(4.0))
  ckpt.close()
  assert ckpt.all_steps() == [1, 2, 3]


def test_read_only_on_an_empty_workdir_creates_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpointing.Checkpointer(str(tmp_path / "run"), read_only=True)
  assert not (tmp_path / "run").exists()
