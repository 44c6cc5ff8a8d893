"""cmim_jax.main under the real world: SIGTERM and resume, a second run on a live workdir,
`--mode eval` without a checkpoint. Subprocesses, each bounded in time."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cmim_jax import runlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/digits.py:smoke", "--config.batch_size=16",
         "--config.log_every_steps=1", "--config.cmim.embed_dim=8",
         "--config.model.stage_sizes=(1,1,1)", "--config.eval_every_steps=1000",
         "--config.checkpoint_every_steps=1000", "--config.num_train_steps=16",
         "--config.cmim.weight=0", "--config.data.eval_split="]
STEPS = 16


def env(**extra):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
  e.pop("XLA_FLAGS", None)
  return e


def run_main(*args, timeout=300, **extra_env):
  return subprocess.run([sys.executable, "-m", "cmim_jax.main", *args], cwd=ROOT,
                        env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def test_eval_without_checkpoint_is_one_line_and_no_traceback(tmp_path):
  r = run_main(*SMALL, "--workdir", str(tmp_path), "--mode", "eval")
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if "no checkpoint in" in l]
  assert len(errors) == 1 and errors[0].startswith("error: "), r.stderr
  assert "Traceback" not in r.stderr, r.stderr


def test_second_run_on_a_live_workdir_is_refused(tmp_path):
  with runlock.RunLock(str(tmp_path), heartbeat_s=0):  # The live run: this test process.
    r = run_main(*SMALL, "--workdir", str(tmp_path))
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if "in use by another run" in l]
  assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0], r.stderr
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_saves_then_the_resumed_run_continues_exactly(tmp_path):
  full, preempted = str(tmp_path / "full"), str(tmp_path / "preempted")
  # The later runs load the compiled steps from the first one (same executables).
  cache = {"CMIM_JAX_COMPILATION_CACHE": str(tmp_path / "xla_cache")}
  log = tmp_path / "preempted.log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "cmim_jax.main", *SMALL, "--workdir", preempted],
                            cwd=ROOT, env=env(**cache), stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while f"step 3/{STEPS}" not in log.read_text():
      assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    seconds = time.monotonic() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
  text = log.read_text()
  assert code == 0, text[-3000:]
  match = re.search(r"Preempted \(SIGTERM\): saved the checkpoint of step (\d+)", text)
  assert match, text[-3000:]
  step = int(match.group(1))
  assert 3 <= step < STEPS and os.listdir(os.path.join(preempted, "checkpoints")) == [str(step)]
  print(f"SIGTERM -> exit: {seconds:.2f} s, checkpoint step {step}")
  r = run_main(*SMALL, "--workdir", preempted, **cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {step}" in r.stderr
  r = run_main(*SMALL, "--workdir", full, **cache)
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = train_losses(full), train_losses(preempted)
  steps = list(range(1, STEPS + 1))
  assert sorted(a) == sorted(b) == steps  # every step logged once, none twice
  np.testing.assert_allclose([b[s] for s in steps], [a[s] for s in steps], rtol=1e-6)


def test_missing_cifar_offline_is_reported_once_with_commands_that_exist(tmp_path):
  e = dict(env(), CMIM_JAX_DATA=str(tmp_path / "cache"), CMIM_JAX_CIFAR_MIRROR="http://127.0.0.1:9")
  r = subprocess.run([sys.executable, "-m", "cmim_jax.main", "--config", "configs/cifar100.py",
                      "--config.data.download=True", "--workdir", str(tmp_path / "run")],
                     cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert r.stderr.count("No data found for dataset 'cifar100'") == 1, r.stderr
  assert "could not download http://127.0.0.1:9/cifar-100-python.tar.gz" in r.stderr
  assert "python -m cmim_jax.data.download cifar100" in r.stderr
  assert "tfds build" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_gs_workdir_without_the_cloud_extra_is_one_line(tmp_path):
  from cmim_jax import paths  # pylint: disable=g-import-not-at-top
  if paths._backend_available("gcs"):  # pylint: disable=protected-access
    pytest.skip("gcsfs is installed here")
  r = subprocess.run([sys.executable, "-m", "cmim_jax.main", "--config",
                      os.path.join(ROOT, "configs", "digits.py:smoke"),
                      "--workdir", "gs://bucket/runs/x"],
                     cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == (
      "error: workdir 'gs://bucket/runs/x' is on gs:// but gcsfs is not installed: "
      "pip install 'cmim_jax[cloud]' (installs gcsfs), or use a local path."), r.stderr
  assert os.listdir(tmp_path) == []  # no local directory called gs:


USER_CONFIG = '''
from cmim_jax import default_config


def get_config():
  config = default_config.get_config()
  config.data.name = "digits"
  config.data.source = "digits"
  config.model.name = "resnet20"
  return config
'''


def test_user_config_outside_the_repository_from_any_directory(tmp_path):
  """A config in the user's own project imports the defaults from the installed package only."""
  project, elsewhere, site = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "site"
  for d in (project, elsewhere, site):
    d.mkdir()
  (project / "my_config.py").write_text(USER_CONFIG)
  # Only the package is importable (as after pip install): no `configs`, no repository on the path.
  os.symlink(os.path.join(ROOT, "cmim_jax"), site / "cmim_jax")
  e = dict(env(), PYTHONPATH=str(site))
  r = subprocess.run([sys.executable, "-m", "cmim_jax.main", "--config",
                      str(project / "my_config.py"), "--config.batch_size=32",
                      "--workdir", str(elsewhere / "run"), "--mode", "eval"],
                     cwd=elsewhere, env=e, capture_output=True, text=True, timeout=300)
  # The config parsed (an override of it applied); eval then stops at the missing checkpoint.
  assert r.returncode == 1, r.stderr[-3000:]
  assert "ModuleNotFoundError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: no checkpoint in "), r.stderr
