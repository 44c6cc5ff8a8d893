"""launch/local.py passes SIGTERM on to every process it started (with stand-in processes)."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    import signal, sys, time
    pid = [a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1]
    def term(*_):
      print(f"process {{pid}} saved", flush=True)
      sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    print(f"process {{pid}} training", flush=True)
    time.sleep(60)
    sys.exit(5)
""")


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
  fake = tmp_path / "python"
  fake.write_text(FAKE_PYTHON.format(python=sys.executable))
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  code = ("import sys; sys.path.insert(0, sys.argv[1]); from launch import local; "
          "sys.exit(local.launch(['--config', 'x'], num_processes=3, devices_per_process=1, "
          "python=sys.argv[2]))")
  proc = subprocess.Popen([sys.executable, "-c", code, ROOT, str(fake)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  while sum("training" in l for l in lines) < 3:
    lines.append(proc.stdout.readline())
    assert lines[-1], "".join(lines)
  t0 = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 0, "".join(lines) + out
  assert time.monotonic() - t0 < 10
  for i in range(3):
    assert f"[p{i}] process {i} saved" in out
