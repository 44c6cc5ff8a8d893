"""A user's own model and quantizer, registered in their own module, trained by
``python -m cmim_jax.main --config.imports=...`` (README, "Extending")."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/digits.py:smoke", "--config.num_train_steps=2",
        "--config.batch_size=16", "--config.log_every_steps=1",
        "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.cmim.embed_dim=8"]


def run_main(args, pythonpath=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([*map(str, pythonpath), ROOT]))
  return subprocess.run([sys.executable, "-m", "cmim_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_user_model_and_quantizer_train(tmp_path):
  """The example module, copied out of the repository, trains for 2 steps with
  CMIM tapping its binary convs and its quantizer's option set on the CLI."""
  user_dir = tmp_path / "user"
  user_dir.mkdir()
  shutil.copy(os.path.join(ROOT, "examples", "my_bnn.py"), user_dir / "my_bnn_user.py")
  workdir = tmp_path / "run"
  r = run_main([*TINY, "--config.imports=my_bnn_user", "--config.model.name=tiny_bnn",
                "--config.model.input_quantizer=gain_sign(gain=0.5)",
                "--workdir", str(workdir)], pythonpath=[user_dir])
  assert r.returncode == 0, r.stderr[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    train = [x for x in map(json.loads, f) if x["split"] == "train"]
  assert [x["step"] for x in train] == [1, 2]
  assert all(np.isfinite(x["loss"]) and np.isfinite(x["cmim_loss"]) for x in train)
  # The taps are the user model's two binary convs.
  assert {k for k in train[0] if k.startswith("cmim_loss/")} == {
      "cmim_loss/conv1", "cmim_loss/conv2"}


def test_inapplicable_model_field_on_the_command_line(tmp_path):
  r = run_main([*TINY, "--config.model.name=vgg_small", "--config.model.stage_sizes=(1,1)",
                "--workdir", str(tmp_path)])
  assert r.returncode != 0
  assert ("config.model.stage_sizes=(1, 1) does not apply to model 'vgg_small'"
          in r.stderr), r.stderr[-3000:]
  assert "its fields: dtype, input_quantizer" in r.stderr


def test_unimportable_module_named(tmp_path):
  r = run_main([*TINY, "--config.imports=no_such_user_module", "--workdir", str(tmp_path)])
  assert r.returncode != 0
  assert "config.imports: cannot import 'no_such_user_module'" in r.stderr


def test_default_config_model_keys_are_the_registry_section():
  """cmim_jax/default_config.py writes the model keys out (it may not import
  JAX); they must be the registry's: same keys, same placeholder types."""
  default_config = pytest.importorskip("cmim_jax.default_config")
  from cmim_jax import models  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  want = models.config_section()
  assert set(config.model.keys()) == set(want.keys())
  for key in want.keys():
    if key == "name":
      continue
    assert config.model[key] is None, key
    assert (config.model.get_type(key) == want.get_type(key)), key
  assert tuple(config.imports) == ()
