"""Start train.py on every worker of a multi-host run: the TPU VM workers of a pod slice (over `gcloud ... ssh
--worker=all`), or N local processes (one machine, a localhost coordinator: what the tests run).

    python -m qwenvl_jax.train.launch --tpu my-v4-32 --zone us-central2-b [--project P] [--repo '~/qwenvl_jax'] \\
        -- --config=configs/stage1_pretrain.py --workdir=/gcs/my-bucket/runs/stage1
    python -m qwenvl_jax.train.launch --local 2 [--devices-per-process 2] -- --config=... --workdir=/tmp/run

Everything after `--` goes to train.py unchanged. On a TPU slice each worker calls `jax.distributed.initialize()`
with no arguments (the TPU runtime tells every process the coordinator, the process count and its id); locally the
launcher passes them (`--config.distributed.*`). Local mode forwards SIGTERM / SIGINT to every process (train.py then
saves a checkpoint and exits, as on a preempted worker), prefixes each output line with its process id, and exits
with the first non-zero exit code (the other processes are then stopped).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tpu_command(name: str, zone: str, train_args, project: str | None = None, repo: str = "~/qwenvl_jax",
                python: str = "python3") -> list[str]:
  """The gcloud command that runs train.py on all workers of TPU VM `name` at once."""
  remote = f"cd {repo} && {python} train.py {' '.join(shlex.quote(a) for a in train_args)} " \
           "--config.distributed.initialize=True"
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}", "--worker=all", f"--command={remote}"]
  return cmd + ([f"--project={project}"] if project else [])


def local_commands(n: int, train_args, port: int, script: str | None = None) -> list[list[str]]:
  """Command lines of n processes of `script` (default: train.py) joined by a coordinator on localhost:port."""
  dist = ["--config.distributed.initialize=True", f"--config.distributed.coordinator_address=localhost:{port}",
          f"--config.distributed.num_processes={n}"]
  return [[sys.executable, script or os.path.join(ROOT, "train.py"), *train_args, *dist,
           f"--config.distributed.process_id={i}"] for i in range(n)]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _pump(i: int, stream) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"[{i}] {line}")
    sys.stdout.flush()


def run_local(n: int, train_args, devices_per_process: int = 1, timeout: float | None = None,
              script: str | None = None) -> int:
  """Run n local processes to the end; -> the first non-zero exit code (0 when all succeed)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env.setdefault("JAX_PLATFORMS", "cpu")
  procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True) for cmd in local_commands(n, train_args, free_port(), script)]
  pumps = [threading.Thread(target=_pump, args=(i, p.stdout), daemon=True) for i, p in enumerate(procs)]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed or all(c is not None for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        failed = [124]
        break
      time.sleep(0.2)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    for p in procs:  # a peer of a failed process would otherwise wait for it until jax's own timeout
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()
    for t in pumps:
      t.join(timeout=5)
  return failed[0] if failed else 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  train_args = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(prog="python -m qwenvl_jax.train.launch", description=__doc__.split("\n\n")[0])
  where = p.add_mutually_exclusive_group(required=True)
  where.add_argument("--tpu", help="TPU VM (pod slice) name")
  where.add_argument("--local", type=int, help="number of local processes")
  p.add_argument("--zone", help="the TPU's zone (with --tpu)")
  p.add_argument("--project", default=None)
  p.add_argument("--repo", default="~/qwenvl_jax", help="this project's folder on every worker (with --tpu)")
  p.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices per local process")
  p.add_argument("--dry-run", action="store_true", help="print the command(s), run nothing")
  p.add_argument("--script", default=None, help="with --local: a Python file to run instead of train.py (it gets "
                 "the flags after '--' and the --config.distributed.* flags)")
  args = p.parse_args(own)
  if args.script is None and not any(a.startswith("--config=") for a in train_args):
    p.error("pass train.py's flags after '--', at least --config=... (and --workdir=...)")
  if args.tpu:
    if not args.zone:
      p.error("--tpu needs --zone")
    cmd = tpu_command(args.tpu, args.zone, train_args, args.project, args.repo)
    print(shlex.join(cmd), flush=True)
    return 0 if args.dry_run else subprocess.call(cmd)
  if args.local < 1:
    p.error(f"--local {args.local}: at least one process")
  if args.dry_run:
    for cmd in local_commands(args.local, train_args, 0, args.script):
      print(shlex.join(cmd))
    return 0
  return run_local(args.local, train_args, args.devices_per_process, script=args.script)


if __name__ == "__main__":
  sys.exit(main())
