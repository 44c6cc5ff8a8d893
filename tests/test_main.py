"""The command line, end to end in subprocesses: errors, eval mode, multi-host."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import local as local_launch
from launch import tpu_pod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = ["--config", "configs/digits.py:smoke", "--config.num_train_steps=4",
         "--config.batch_size=16", "--config.log_every_steps=1",
         "--config.eval_every_steps=4", "--config.checkpoint_every_steps=2",
         "--config.cmim.embed_dim=8", "--config.model.stage_sizes=(1,1,1)"]


def run_main(*args, devices=4, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "cmim_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_parsing_configs_imports_neither_jax_nor_tfds():
  """Reading a config is cheap: default_config and configs/* stay off JAX and tfds."""
  code = (
      "import glob, importlib, os, sys\n"
      "from cmim_jax import default_config\n"
      "default_config.get_config('smoke')\n"
      "loaded = 0\n"
      "for path in sorted(glob.glob('configs/*.py')):\n"
      "  name = os.path.basename(path)[:-3]\n"
      "  if name != '__init__':\n"
      "    importlib.import_module('configs.' + name).get_config()\n"
      "    loaded += 1\n"
      "heavy = sorted(m for m in ('jax', 'jaxlib', 'tensorflow', 'tensorflow_datasets', 'flax')\n"
      "               if m in sys.modules)\n"
      "print(loaded, heavy)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  loaded, heavy = r.stdout.split(maxsplit=1)
  assert int(loaded) >= 5 and heavy.strip() == "[]", r.stdout


def test_unknown_config_key_fails_naming_it(tmp_path):
  r = run_main(*SMOKE, "--config.cmim.wieght=1", "--workdir", str(tmp_path))
  assert r.returncode != 0
  assert "wieght" in r.stderr


def test_bad_config_value_fails_naming_it(tmp_path):
  r = run_main(*SMOKE, "--config.optimizer=sgdd", "--workdir", str(tmp_path))
  assert r.returncode != 0
  assert "config.optimizer='sgdd'" in r.stderr


def test_train_then_eval_mode(tmp_path):
  r = run_main(*SMOKE, "--workdir", str(tmp_path))
  assert r.returncode == 0, r.stderr[-3000:]
  train_records = records(tmp_path, "train")
  assert [x["step"] for x in train_records] == [1, 2, 3, 4]
  for key in ("loss", "accuracy", "learning_rate", "images_per_second", "cmim_loss"):
    assert all(np.isfinite(x[key]) for x in train_records), key
  assert sum(k.startswith("cmim_loss/") for k in train_records[0]) == 3
  assert os.listdir(tmp_path / "tb")
  r = run_main(*SMOKE, "--workdir", str(tmp_path), "--mode", "eval",
               "--config.data.eval_split=train[:100]")
  assert r.returncode == 0, r.stderr[-3000:]
  last = records(tmp_path, "eval")[-1]
  assert last["num_examples"] == 100 and last["eval_split"] == "train[:100]"
  assert last["step"] == 4 and 0.0 <= last["accuracy"] <= 1.0


def test_eval_mode_without_checkpoint_fails_clearly(tmp_path):
  r = run_main(*SMOKE, "--workdir", str(tmp_path), "--mode", "eval")
  assert r.returncode != 0
  assert "no checkpoint" in r.stderr


@pytest.mark.multiprocess
def test_two_processes_equal_one_process(tmp_path, capfd):
  one, two = tmp_path / "one", tmp_path / "two"
  r = run_main(*SMOKE, "--workdir", str(one), devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    rc = local_launch.launch([*SMOKE, "--workdir", str(two)], num_processes=2,
                             devices_per_process=2, timeout=600)
  finally:
    os.chdir(cwd)
  assert rc == 0, capfd.readouterr().out[-3000:]
  a, b = records(one, "train"), records(two, "train")
  assert len(a) == len(b) == 4
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rb["cmim_loss"], ra["cmim_loss"], rtol=1e-5, atol=1e-6)
  ea, eb = records(one, "eval")[-1], records(two, "eval")[-1]
  assert ea["num_examples"] == eb["num_examples"]
  np.testing.assert_allclose(eb["accuracy"], ea["accuracy"], atol=1e-6)


def test_tpu_pod_launcher_dry_run(capsys):
  rc = tpu_pod.main(["--tpu", "pod", "--zone", "z", "--repo", "https://x/y.git",
                     "--dry_run", "--", "--config", "configs/cifar100.py",
                     "--workdir", "gs://b/run"])
  out = capsys.readouterr().out.strip().splitlines()
  assert rc == 0 and len(out) == 2
  assert all("--worker=all" in line and "tpu-vm ssh pod" in line for line in out)
  assert "cmim_jax.main --config configs/cifar100.py --workdir gs://b/run" in out[1]
