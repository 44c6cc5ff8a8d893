r"""Runs cmim_jax on every worker of a Cloud TPU pod slice (gcloud tpu-vm ssh).

  python launch/tpu_pod.py --tpu my-v4-32 --zone us-central2-b \
      --repo https://example.org/cmim_jax.git --dry_run -- \
      --config configs/cifar100.py --workdir gs://my-bucket/runs/c100

Two phases, each one ``gcloud compute tpus tpu-vm ssh --worker=all`` command:
``setup`` clones (or updates) the repository on every worker and installs it
into ``.venv`` with ``jax[tpu]``; ``run`` starts ``python -m cmim_jax.main``
on every worker at once. JAX finds its peers from the TPU metadata, so no
coordinator flags are needed. ``--dry_run`` prints the commands instead of
running them. Use a ``gs://`` workdir so that every worker writes to one place.
"""

import argparse
import shlex
import subprocess
import sys


def ssh_command(tpu: str, zone: str, project: str | None, remote: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
         "--worker=all", f"--command={remote}"]
  if project:
    cmd.insert(5, f"--project={project}")
  return cmd


def commands(args, main_args) -> list[list[str]]:
  d = shlex.quote(args.remote_dir)
  setup = (f"if [ -d {d} ]; then git -C {d} pull --ff-only; "
           f"else git clone {shlex.quote(args.repo)} {d}; fi && cd {d} && "
           "python3 -m venv .venv && .venv/bin/pip install -q -U pip && "
           ".venv/bin/pip install -q -e . 'jax[tpu]'")
  run = (f"cd {d} && .venv/bin/python -m cmim_jax.main "
         + " ".join(shlex.quote(a) for a in main_args))
  phases = {"setup": [setup], "run": [run], "all": [setup, run]}[args.phase]
  return [ssh_command(args.tpu, args.zone, args.project, r) for r in phases]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--repo", default="", help="git URL of this repository (setup phase)")
  parser.add_argument("--remote_dir", default="cmim_jax")
  parser.add_argument("--phase", choices=["setup", "run", "all"], default="all")
  parser.add_argument("--dry_run", action="store_true", help="print, do not run")
  parser.add_argument("main_args", nargs=argparse.REMAINDER, help="cmim_jax.main arguments, after --")
  args = parser.parse_args(argv)
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  if args.phase in ("run", "all") and not any(a.startswith("--config") for a in main_args):
    parser.error("give cmim_jax.main arguments after --, at least --config and --workdir")
  if args.phase in ("setup", "all") and not args.repo:
    parser.error("--repo is needed for the setup phase")
  for cmd in commands(args, main_args):
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      rc = subprocess.call(cmd)
      if rc:
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
