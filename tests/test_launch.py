"""The multi-host launcher docs/tpu.md uses: local processes get SIGTERM (as preempted TPU workers do) and a failure
stops the rest, and the TPU VM command it would run on every worker of a pod slice. (2 processes of train.py
training one global mesh through it: tests/test_train_distributed.py.)"""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from qwenvl_jax.train import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launcher(args, log):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "qwenvl_jax.train.launch", *args], env=env, cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT)


WAITER = """
import signal, sys, time
pid = [a for a in sys.argv if a.startswith("--config.distributed.process_id=")][0].split("=")[1]
if "fail" in sys.argv and pid == "1":
    print("failing", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", pid, flush=True), sys.exit(0)))
print("ready", pid, flush=True)
time.sleep(120)
sys.exit(5)
"""


def test_local_processes_get_sigterm_and_failures_stop_the_rest(tmp_path):
  """The launcher's process handling (train.py itself across 2 processes: tests/test_train_distributed.py, which
  starts them with this launcher): SIGTERM reaches every process, output is prefixed, the first failure is the
  exit code and stops the others."""
  script = tmp_path / "waiter.py"
  script.write_text(WAITER)
  with open(tmp_path / "run.log", "w") as log:
    p = _launcher(["--local", "2", "--script", str(script), "--", "wait"], log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (tmp_path / "run.log").read_text().count("ready") < 2:
      time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
  text = (tmp_path / "run.log").read_text()
  assert rc == 0 and "[0] got SIGTERM 0" in text and "[1] got SIGTERM 1" in text, text
  with open(tmp_path / "fail.log", "w") as log:
    t0 = time.monotonic()
    rc = _launcher(["--local", "2", "--script", str(script), "--", "fail"], log).wait(timeout=60)
  assert rc == 3 and time.monotonic() - t0 < 30, (tmp_path / "fail.log").read_text()  # process 0 killed, not waited


def test_tpu_and_dry_run_commands(capsys):
  cmd = launch.tpu_command("my-v4-32", "us-central2-b", ["--config=configs/stage1_pretrain.py",
                                                           "--workdir=/gcs/b/run 1"], project="p")
  assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32", "--zone=us-central2-b",
                     "--worker=all"] and cmd[-1] == "--project=p"
  # every worker: the project folder, train.py with the flags (quoted), the runtime's own process discovery
  assert cmd[8] == ("--command=cd ~/qwenvl_jax && python3 train.py --config=configs/stage1_pretrain.py "
                    "'--workdir=/gcs/b/run 1' --config.distributed.initialize=True")
  assert launch.main(["--local", "2", "--dry-run", "--", "--config=c.py"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all("--config.distributed.num_processes=2" in ln for ln in lines)
  assert [shlex.split(ln)[-1] for ln in lines] == ["--config.distributed.process_id=0",
                                                   "--config.distributed.process_id=1"]
  for bad, message in ((["--tpu", "x", "--", "--config=c.py"], "--tpu needs --zone"),
                       (["--local", "2"], "pass train.py's flags after '--'")):
    with pytest.raises(SystemExit):
      launch.main(bad)
    assert message in capsys.readouterr().err
