"""The multi-host launcher docs/tpu.md uses: 2 local processes of the real train.py joined by a localhost
coordinator train (one global mesh over both), SIGTERM reaches every process (each saves and exits, as preempted
TPU workers do), and the TPU VM command it would run on every worker of a pod slice."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from train_runs import TINY_CONFIG

from qwenvl_jax.train import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launcher(args, log):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "qwenvl_jax.train.launch", *args], env=env, cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_local_processes_train_then_stop_on_sigterm(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  run = tmp_path / "run"
  with open(tmp_path / "run.log", "w") as log:
    p = _launcher(["--local", "2", "--devices-per-process", "1", "--", f"--config={config}",
                   f"--workdir={run}", "--config.optim.total_steps=100000", "--config.log.tensorboard=False"], log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None and len(_steps(run)) < 2:
      time.sleep(0.5)
    # preemption: SIGTERM to the launcher reaches every process; each saves the step it reached and exits 0
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=300)
  text = (tmp_path / "run.log").read_text()
  assert rc == 0, text[-4000:]
  assert "[0] " in text and "[1] " in text  # both processes' output, prefixed
  steps = _steps(run)
  assert len(steps) >= 2 and steps == list(range(1, len(steps) + 1)), text[-3000:]
  saved = [int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()]
  assert saved and steps[-1] <= max(saved) < 100000, text[-3000:]


def _steps(workdir) -> list[int]:
  try:
    with open(workdir / "metrics.jsonl") as f:
      return [json.loads(ln)["step"] for ln in f if ln.strip()]
  except (FileNotFoundError, json.JSONDecodeError):
    return []


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
