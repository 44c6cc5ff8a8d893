r"""Submits a multi-node GPU run of cmim_jax to SLURM (sbatch), requeued on preemption.

  python launch/slurm.py --nodes 2 --gpus_per_node 4 --partition gpu \
      --time 24:00:00 --dry_run -- \
      --config configs/cifar100.py --workdir /shared/runs/c100

Writes an sbatch script that starts one task per GPU (``srun``); every task
runs ``python -m cmim_jax.main`` and ``jax.distributed`` finds its peers
from SLURM's environment (``SLURM_NTASKS``, ``SLURM_PROCID``,
``SLURM_STEP_NODELIST``, ``SLURM_LOCALID``: task i of a node uses GPU i), so
no coordinator flags are needed. ``--dry_run`` prints the script instead of
submitting it.

Preemption and the time limit: SLURM sends SIGTERM to every task when it
preempts the job; each one saves a checkpoint at the same step and exits 0.
``--signal_lead_s`` seconds before the time limit SLURM signals the batch
shell (USR1), which sends SIGTERM to the tasks, waits for their checkpoint
and puts the job back in the queue (``scontrol requeue``); the requeued job
resumes from that checkpoint. The workdir must be on storage that every node
sees (a shared file system or ``gs://``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

# The batch shell waits on srun in the background so that a trap can run
# while the tasks are still alive (bash defers traps while a foreground job runs).
_BODY = r"""
set -u
export PYTHONUNBUFFERED=1
cd {workdir_of_repo}
requeue=0
on_usr1() {{
  echo "[slurm.py] time limit near: asking the tasks to checkpoint, then requeueing job $SLURM_JOB_ID"
  requeue=1
  kill -TERM "$srun_pid" 2>/dev/null
}}
on_term() {{
  echo "[slurm.py] SIGTERM: the tasks save a checkpoint and stop"
  kill -TERM "$srun_pid" 2>/dev/null
}}
trap on_usr1 USR1
trap on_term TERM
srun {srun_flags}{command} &
srun_pid=$!
rc=0
# wait returns early (>128) when a trap fires; wait again until srun is done.
while :; do
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if [ "$requeue" = 1 ] && [ "$rc" = 0 ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
"""


def sbatch_script(args, main_args) -> str:
  """The batch script for ``args`` (see :func:`parser`) running ``main_args``."""
  tasks = args.gpus_per_node if args.gpus_per_node > 0 else 1
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={tasks}"]
  if args.gpus_per_node > 0:
    lines.append(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
  lines += [f"#SBATCH --cpus-per-task={args.cpus_per_task}",
            f"#SBATCH --time={args.time}",
            f"#SBATCH --output={os.path.join(args.log_dir, '%x-%j.out')}",
            "#SBATCH --open-mode=append",  # A requeued job appends to the same log.
            "#SBATCH --requeue",
            f"#SBATCH --signal=B:USR1@{args.signal_lead_s}"]
  for flag in ("partition", "account", "qos", "constraint"):
    value = getattr(args, flag)
    if value:
      lines.append(f"#SBATCH --{flag}={value}")
  lines += [f"#SBATCH {extra}" for extra in args.sbatch_arg]
  if args.setup:
    lines.append(args.setup)
  command = shlex.join([args.python, "-m", "cmim_jax.main", *main_args])
  # srun must not kill the other tasks when one exits first: each one logs
  # why it stopped (peer watchdog) before the step ends.
  srun_flags = "--kill-on-bad-exit=0 "
  return "\n".join(lines) + "\n" + _BODY.format(
      workdir_of_repo=shlex.quote(args.repo_dir), srun_flags=srun_flags, command=command)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nodes", type=int, default=1)
  p.add_argument("--gpus_per_node", type=int, default=1,
                 help="one task (JAX process) per GPU; 0 for a CPU-only job (one task per node)")
  p.add_argument("--cpus_per_task", type=int, default=8)
  p.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--qos", default=None)
  p.add_argument("--constraint", default=None)
  p.add_argument("--job_name", default="cmim_jax")
  p.add_argument("--log_dir", default="slurm_logs", help="where sbatch writes the job's output")
  p.add_argument("--repo_dir", default=os.getcwd(), help="directory the job runs in")
  p.add_argument("--python", default=sys.executable, help="python with cmim_jax installed")
  p.add_argument("--setup", default="", help="shell line run before srun (module load ...)")
  p.add_argument("--signal_lead_s", type=int, default=300,
                 help="seconds before the time limit at which the tasks checkpoint and the job requeues")
  p.add_argument("--sbatch_arg", action="append", default=[],
                 help="extra #SBATCH line, e.g. --sbatch_arg=--mem=64G (repeatable)")
  p.add_argument("--dry_run", action="store_true", help="print the script, do not submit")
  p.add_argument("main_args", nargs=argparse.REMAINDER, help="cmim_jax.main arguments, after --")
  return p


def main(argv=None) -> int:
  p = parser()
  args = p.parse_args(argv)
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  if not any(a.startswith("--config") for a in main_args) or not any(
      a.startswith("--workdir") for a in main_args):
    p.error("give cmim_jax.main arguments after --, at least --config and --workdir")
  if args.nodes < 1 or args.gpus_per_node < 0:
    p.error("--nodes must be >= 1 and --gpus_per_node >= 0")
  script = sbatch_script(args, main_args)
  if args.dry_run:
    print(script, end="")
    return 0
  os.makedirs(args.log_dir, exist_ok=True)
  return subprocess.run(["sbatch"], input=script, text=True, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
