"""Checkpoints are atomic: a process killed during a save loses only that save."""

import os
import subprocess
import sys
import textwrap

import numpy as np

from cmim_jax import checkpointing

CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    import jax.numpy as jnp
    from cmim_jax import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1], keep=3)
    ckpt.save(1, {"w": jnp.full((4,), 1.0), "big": jnp.zeros((8,))})
    ckpt.wait()
    # A large second checkpoint, and the process dies while it is being written.
    ckpt.save(2, {"w": jnp.full((4,), 2.0), "big": jnp.ones((64 * 1024 * 1024 // 4,))})
    os._exit(17)
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 17, r.stderr[-2000:]
  left = os.listdir(tmp_path / "checkpoints")
  # The kill did interrupt the second save: its temporary directory is there.
  assert "1" in left and "2" not in left
  assert any(name.startswith("2.") for name in left), left
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1]
  restored = ckpt.restore({"w": np.zeros((4,), np.float32), "big": np.zeros((8,), np.float32)})
  np.testing.assert_array_equal(restored["w"], np.full((4,), 1.0))
  # The directory stays usable: the next save of step 2 succeeds.
  ckpt.save(2, {"w": np.full((4,), 3.0, np.float32), "big": np.zeros((8,), np.float32)})
  ckpt.close()
  again = checkpointing.Checkpointer(str(tmp_path))
  assert again.latest_step() == 2
  np.testing.assert_array_equal(
      again.restore({"w": np.zeros((4,), np.float32), "big": np.zeros((8,), np.float32)})["w"],
      np.full((4,), 3.0))


def test_restore_without_checkpoint_names_the_directory(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  try:
    ckpt.restore({"w": np.zeros(3)})
  except FileNotFoundError as e:
    assert str(tmp_path) in str(e) and "--mode train" in str(e)
  else:
    raise AssertionError("restore without a checkpoint must raise")
