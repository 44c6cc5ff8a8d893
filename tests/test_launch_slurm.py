"""The SLURM launcher: the sbatch script it prints, and that script run with fake srun/scontrol."""

import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch import slurm  # pylint: disable=g-import-not-at-top

MAIN_ARGS = ["--config", "configs/cifar100.py", "--workdir", "/shared/runs/c 100",
             "--config.batch_size=512"]


def dry_run(capsys, *flags):
  rc = slurm.main([*flags, "--dry_run", "--", *MAIN_ARGS])
  assert rc == 0
  return capsys.readouterr().out


def sbatch_options(script):
  pairs = (line[len("#SBATCH --"):].partition("=") for line in script.splitlines()
           if line.startswith("#SBATCH --"))
  return {key: value for key, _, value in pairs}


def test_dry_run_prints_the_sbatch_script(capsys):
  script = dry_run(capsys, "--nodes", "2", "--gpus_per_node", "4", "--partition", "gpu",
                   "--time", "04:00:00", "--python", "/opt/venv/bin/python",
                   "--repo_dir", "/src/cmim", "--sbatch_arg=--mem=64G")
  assert script.startswith("#!/bin/bash\n")
  opts = sbatch_options(script)
  assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "4"
  assert opts["gpus-per-node"] == "4" and opts["partition"] == "gpu"
  assert opts["time"] == "04:00:00" and opts["signal"] == "B:USR1@300"
  assert "#SBATCH --requeue" in script.splitlines()
  assert "#SBATCH --mem=64G" in script
  assert "account" not in opts
  srun = next(line for line in script.splitlines() if line.startswith("srun "))
  argv = shlex.split(srun.rstrip("&"))
  # The workdir with a space survives quoting; jax.distributed needs no coordinator flags.
  assert argv[argv.index("/opt/venv/bin/python"):] == [
      "/opt/venv/bin/python", "-m", "cmim_jax.main", *MAIN_ARGS]
  assert not any("coordinator" in a for a in argv)
  assert "cd /src/cmim" in script
  r = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
  assert r.returncode == 0, r.stderr


def test_cpu_only_job_has_one_task_per_node(capsys):
  opts = sbatch_options(dry_run(capsys, "--nodes", "3", "--gpus_per_node", "0"))
  assert opts["nodes"] == "3" and opts["ntasks-per-node"] == "1"
  assert "gpus-per-node" not in opts


def test_missing_main_arguments_is_an_error(capsys):
  with pytest.raises(SystemExit):
    slurm.main(["--dry_run", "--", "--config", "configs/cifar100.py"])
  assert "--workdir" in capsys.readouterr().err


FAKE_SRUN = """#!/usr/bin/env python3
import signal, sys, time
log = open(sys.argv[0] + ".log", "a")
log.write("start " + " ".join(sys.argv[1:]) + "\\n"); log.flush()
def term(*_):
  time.sleep(0.5)  # the checkpoint
  log.write("saved\\n"); log.flush(); sys.exit(0)
signal.signal(signal.SIGTERM, term)
for _ in range(600):
  time.sleep(0.1)
log.write("finished\\n"); sys.exit(0)
"""

FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$0.log"
"""


def run_script_with_fakes(tmp_path, capsys, sig):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  script = dry_run(capsys, "--repo_dir", str(tmp_path), "--python", "python")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
  proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 20
  while not (bin_dir / "srun.log").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)  # srun installs its handler
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=30)
  srun_log = (bin_dir / "srun.log").read_text().splitlines()
  scontrol_log = bin_dir / "scontrol.log"
  requeued = scontrol_log.read_text().split() if scontrol_log.exists() else []
  return proc.returncode, out, srun_log, requeued


def test_time_limit_signal_checkpoints_then_requeues(tmp_path, capsys):
  rc, out, srun_log, requeued = run_script_with_fakes(tmp_path, capsys, signal.SIGUSR1)
  assert rc == 0, out
  assert srun_log[0].startswith("start --kill-on-bad-exit=0 python -m cmim_jax.main")
  assert srun_log[1:] == ["saved"]  # the tasks got SIGTERM and finished their save
  assert requeued == ["requeue", "4242"]  # and only then was the job requeued
  assert "requeueing job 4242" in out


def test_preemption_sigterm_checkpoints_without_requeue(tmp_path, capsys):
  rc, out, srun_log, requeued = run_script_with_fakes(tmp_path, capsys, signal.SIGTERM)
  assert rc == 0, out
  assert srun_log[1:] == ["saved"]
  assert requeued == []  # SLURM itself requeues a preempted job
