"""train.py end to end on a tiny config (CPU): bitwise-exact resume after SIGKILL, SIGTERM save-and-exit, NaN/Inf
stop and skip, one-line errors with exit code 2, the --dry_run memory plan of the stage configs, the logs (config.json,
metrics.jsonl, TensorBoard) and the chained demo. Every run is a `python train.py` subprocess.

Runs are shared through a session directory that pytest-xdist workers see too (`_once`), and all subprocesses share a
persistent JAX compilation cache, so each distinct train step compiles once per session.
"""

import fcntl
import glob
import itertools
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from qwenvl_jax.data.shapes import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = '''
from qwenvl_jax.train.config import base_config


def get_config():
  c = base_config()
  c.model.name = "qwen_vl_demo"
  c.model.dtype = "float32"
  c.data.update(source="shapes", tokenizer="shapes", image_size=56, seq_len=96, max_images=2, batch_size=4,
                num_records=400, packing_window=64)
  c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=2, total_steps=16, loss_chunk=96)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=4, keep=5, async_save=True)
  c.log.update(every=1, progress=False, tensorboard=True)
  c.peak_flops = 1e12
  return c
'''
TOTAL = 16
BATCH, SEQ = 4, 96
# The reference run's command-line overrides (every run compared with it uses them too).
REF_OVERRIDES = ["--config.optim.weight_decay=0.01", "--config.data.packing_window=48"]


# --- helpers ------------------------------------------------------------------------------------------------------

def _session_root(tmp_path_factory):
  """A directory all xdist workers of this session share (the base temp dir without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def root(tmp_path_factory):
  return _session_root(tmp_path_factory)


@pytest.fixture(scope="session")
def env(root):
  cache = root / "jax_cache"
  cache.mkdir(exist_ok=True)
  e = dict(os.environ)
  e.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  return e


def write_config(directory) -> str:
  path = os.path.join(str(directory), "tiny_config.py")
  with open(path, "w") as f:
    f.write(TINY_CONFIG)
  return path


def train(env, *args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def start(env, workdir, *args) -> subprocess.Popen:
  """A train.py process in the background; its stdout/stderr go to workdir/../<name>.{out,err}."""
  with open(f"{workdir}.out", "w") as out, open(f"{workdir}.err", "w") as err:
    return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *map(str, args)], cwd=ROOT,
                            env=env, stdout=out, stderr=err)


def describe(r) -> str:
  return f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def metrics(workdir) -> list[dict]:
  """Complete lines of workdir/metrics.jsonl (a line still being written is left out)."""
  path = os.path.join(str(workdir), "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  return [json.loads(ln) for ln in text.split("\n")[:-1] if ln.strip()]


def checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoints (Orbax writes `<step>.orbax-checkpoint-tmp*` and renames it when complete)."""
  d = os.path.join(str(workdir), "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def partial_checkpoints(workdir) -> list[str]:
  d = os.path.join(str(workdir), "checkpoints")
  return [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(d) else []


def load_state(workdir, step) -> dict[str, np.ndarray]:
  """The saved train state of one checkpoint as {path: array} (params/..., opt_state/..., step, rng)."""
  import jax
  import orbax.checkpoint as ocp
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.PyTreeCheckpointer() as ck:
      tree = ck.restore(os.path.join(str(workdir), "checkpoints", str(step), "state"))
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def subtree(state: dict, prefix: str) -> dict:
  out = {k: v for k, v in state.items() if k.startswith(prefix)}
  assert out, f"nothing under {prefix}"
  return out


def assert_identical(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
  assert not different, f"{len(different)} arrays differ, e.g. {different[:3]}"


def error_line(stderr: str) -> str:
  """The single `error:` line train.py may print; library warnings (and their source lines) are ignored."""
  lines, skip_indented = [], False
  for ln in stderr.splitlines():
    if "Warning" in ln:
      skip_indented = True
      continue
    if skip_indented and ln.startswith(" "):
      continue
    skip_indented = False
    if ln.strip():
      lines.append(ln)
  assert "Traceback" not in stderr, stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  return lines[0]


def _once(root, name, produce) -> dict:
  """produce(directory) -> JSON-able dict, run once per session even across xdist workers (a file lock)."""
  d = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = root / f"{name}.json"
    if not done.exists():
      d.mkdir(exist_ok=True)
      done.write_text(json.dumps(produce(d)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def reference(root, env):
  """One uninterrupted 16-step run (checkpoints every 4) that the resume tests compare against."""
  def produce(d):
    wd = d / "workdir"
    r = train(env, f"--config={write_config(d)}", f"--workdir={wd}", *REF_OVERRIDES)
    return {"workdir": str(wd), "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
  ref = _once(root, "reference", produce)
  assert ref["rc"] == 0, describe(subprocess.CompletedProcess([], ref["rc"], ref["stdout"], ref["stderr"]))
  ref["metrics"] = metrics(ref["workdir"])
  ref["losses"] = {m["step"]: m["last_loss"] for m in ref["metrics"]}
  return ref


# --- resume, SIGKILL, SIGTERM -------------------------------------------------------------------------------------

def test_reference_run_is_complete(reference):
  assert [m["step"] for m in reference["metrics"]] == list(range(1, TOTAL + 1))
  assert checkpoint_steps(reference["workdir"]) == [4, 8, 12, 16]
  assert "resumed" not in reference["stdout"]
  losses = [reference["losses"][s] for s in range(1, TOTAL + 1)]
  assert all(math.isfinite(x) for x in losses)
  assert 6.5 < losses[0] < 7.5  # ~ln(1024) at random init
  assert np.mean(losses[-4:]) < losses[0] - 1.5  # it learns


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(reference, env, tmp_path):
  """Killed without warning after checkpoint 8, preferably while checkpoint 12 is half written (its async save
  takes ~0.5 s here), the run resumes from the latest complete checkpoint and repeats the reference bit for bit."""
  wd = tmp_path / "run"
  proc = start(env, wd, f"--config={write_config(tmp_path)}", *REF_OVERRIDES)
  deadline = time.time() + 600
  try:
    while True:
      assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be killed"
      assert time.time() < deadline, "no checkpoint 8 within 10 minutes"
      steps = [m["step"] for m in metrics(wd)]
      saving = [n for n in partial_checkpoints(wd) if 8 < int(n.split(".")[0]) < TOTAL]
      if 8 in checkpoint_steps(wd) and (saving or (steps and steps[-1] >= 14)):
        os.kill(proc.pid, signal.SIGSTOP)  # freeze it while we look, then kill it without warning
        break
      time.sleep(0.002)
    finished, partial, last_logged = checkpoint_steps(wd), partial_checkpoints(wd), metrics(wd)[-1]["step"]
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  k = finished[-1]
  assert 8 <= k < TOTAL and 9 <= last_logged < TOTAL, (finished, last_logged)
  print(f"killed after step {last_logged}: complete checkpoints {finished}, partial {partial}")
  before = metrics(wd)
  assert [m["step"] for m in before] == list(range(1, last_logged + 1))

  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", *REF_OVERRIDES)
  assert r.returncode == 0, describe(r)
  assert f"resumed from step {k}" in r.stdout
  assert re.findall(r"^step (\d+)/16", r.stdout, re.MULTILINE) == [str(s) for s in range(k + 1, TOTAL + 1)]
  after = metrics(wd)
  assert after[:k] == before[:k]
  assert [m["step"] for m in after] == list(range(1, TOTAL + 1))  # steps k+1.. logged once, by the resumed run
  # Bitwise: same data order (Grain iterator state), same optimizer state, same RNG.
  assert [m["last_loss"] for m in after] == [reference["losses"][s] for s in range(1, TOTAL + 1)]
  # TensorBoard is told to drop what the killed run logged after step k.
  assert (k + 1, "START") in session_starts(wd / "tensorboard")
  assert_identical(load_state(wd, TOTAL), load_state(reference["workdir"], TOTAL))
  assert checkpoint_steps(wd) == [4, 8, 12, 16] and not partial_checkpoints(wd)  # a half-written one is redone
  with open(wd / "checkpoints" / str(TOTAL) / "data" / "metadata") as a, \
       open(os.path.join(reference["workdir"], "checkpoints", str(TOTAL), "data", "metadata")) as b:
    assert json.load(a) == json.load(b)


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes(reference, env, tmp_path):
  wd = tmp_path / "run"
  proc = start(env, wd, f"--config={write_config(tmp_path)}", *REF_OVERRIDES)
  deadline = time.time() + 600
  try:
    while not (metrics(wd) and metrics(wd)[-1]["step"] >= 3):
      assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before SIGTERM"
      assert time.time() < deadline, "no step 3 within 10 minutes"
      time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
  finally:
    proc.kill()
    proc.wait()
  out = (tmp_path / "run.out").read_text()
  assert proc.returncode == 0, out + (tmp_path / "run.err").read_text()
  m = re.search(r"SIGTERM: saved step (\d+), exiting", out)
  assert m, out
  n = int(m.group(1))
  assert 3 <= n < TOTAL
  assert metrics(wd)[-1]["step"] == n  # it finished the step it was in, then stopped
  assert checkpoint_steps(wd)[-1] == n  # saved outside the every-4 schedule if need be

  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", *REF_OVERRIDES)
  assert r.returncode == 0, describe(r)
  assert f"resumed from step {n}" in r.stdout
  assert re.findall(r"^step (\d+)/16", r.stdout, re.MULTILINE) == [str(s) for s in range(n + 1, TOTAL + 1)]
  assert [x["step"] for x in metrics(wd)] == list(range(1, TOTAL + 1))
  assert [x["last_loss"] for x in metrics(wd)] == [reference["losses"][s] for s in range(1, TOTAL + 1)]
  assert_identical(load_state(wd, TOTAL), load_state(reference["workdir"], TOTAL))


# --- NaN / Inf ----------------------------------------------------------------------------------------------------

NAN_ARGS = ["--config.optim.lr=1e30", "--config.optim.min_lr=0", "--config.optim.total_steps=6",
            "--config.checkpoint.every=1", "--config.checkpoint.keep=10"]


@pytest.mark.slow
def test_nonfinite_stop(env, tmp_path):
  wd = tmp_path / "run"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", *NAN_ARGS, "--config.nonfinite=stop")
  assert r.returncode == 2, describe(r)
  line = error_line(r.stderr)
  m = re.search(r"non-finite loss or gradient at step (\d+) .*last checkpoint \(step (\d+)\)", line)
  assert m, line
  bad, good = int(m.group(1)), int(m.group(2))
  logged = metrics(wd)
  assert [x["step"] for x in logged] == list(range(1, bad))  # the bad step is not logged
  assert all(math.isfinite(x["last_loss"]) for x in logged)
  assert bad >= 2 and good == bad - 1 == checkpoint_steps(wd)[-1]  # the message names the checkpoint on disk
  params = subtree(load_state(wd, good), "params/")
  assert all(np.isfinite(v).all() for v in params.values())
  # The absurd learning rate really was applied before the stop: the last good params are astronomically large.
  assert max(float(np.abs(v).max()) for v in params.values()) > 1e20
  # The helper the next stage starts from (init.source=checkpoint) reads the same params.
  import jax
  from jax.sharding import SingleDeviceSharding

  from qwenvl_jax.config import get_config
  from qwenvl_jax.model import abstract_params
  from qwenvl_jax.train.checkpointing import latest_params
  abstract = abstract_params(get_config("qwen_vl_demo", dtype="float32"))
  restored, step = latest_params(str(wd), abstract, jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]),
                                                                  abstract))
  assert step == good
  flat = {"params/" + "/".join(str(k.key) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(restored)}
  assert_identical(flat, params)


@pytest.mark.slow
def test_nonfinite_skip(env, tmp_path):
  wd = tmp_path / "run"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", *NAN_ARGS, "--config.nonfinite=skip",
            "--config.log.every=2")
  assert r.returncode == 0, describe(r)
  skipped = [int(s) for s in re.findall(r"step (\d+): non-finite loss or gradient, update skipped", r.stderr)]
  assert skipped, r.stderr
  first = skipped[0]
  assert first >= 2 and skipped == list(range(first, 7))  # blown-up params stay blown up: every later step skips
  assert checkpoint_steps(wd)[-1] == 6
  final, last_good = load_state(wd, 6), load_state(wd, first - 1)
  params = subtree(final, "params/")
  assert all(np.isfinite(v).all() for v in params.values())
  # Skipped steps change nothing but the step counter.
  assert int(final["step"]) == 6 and int(last_good["step"]) == first - 1
  assert_identical({k: v for k, v in final.items() if k != "step"},
                   {k: v for k, v in last_good.items() if k != "step"})
  logged = metrics(wd)
  assert [x["step"] for x in logged] == [2, 4, 6]
  for x in logged:
    window = {x["step"] - 1, x["step"]}
    assert math.isnan(x["last_loss"]) == (x["step"] in skipped)
    if window <= set(skipped):  # nothing updated in the window: no mean loss to report (not 0.0)
      assert math.isnan(x["loss"]) and not any(k.startswith("loss/") for k in x), x
    else:
      assert math.isfinite(x["loss"]) and all(math.isfinite(v) for k, v in x.items() if k.startswith("loss/")), x
    # Throughput counts every step run, skipped or not: a step holds at most batch x seq_len tokens. The run's
    # first step (compilation) is left out of throughput.
    if x["step"] > 1:
      assert 0 < x["tokens_per_s"] / x["steps_per_s"] <= BATCH * SEQ, x


# --- one-line errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expect", [
    (["--config.optim.bogus=1"], "unknown key 'bogus'"),
    (["--config.nonfinite=maybe"], "nonfinite 'maybe'"),
    (["--config.optim.lr=abc"], "could not convert string to float: 'abc'"),
    (["--config.optim.lr=1e39"], "optim.lr 1e+39 overflows float32"),
    (["--config.model.name=qwen_vl_8b"], "model.name 'qwen_vl_8b'"),
    (["--config=/nonexistent/config.py"], "/nonexistent/config.py"),
    (["--config=configs/stage1_pretrain.py", "--dry_run", "--config.mesh.fsdp=-1"], "explicit mesh sizes"),
], ids=["unknown-key", "bad-value", "bad-type", "lr-overflow", "bad-model", "no-config", "dry-run-mesh"])
def test_bad_config_is_one_error_line(env, tmp_path, args, expect):
  config = [] if any(a.startswith("--config=") for a in args) else [f"--config={write_config(tmp_path)}"]
  r = train(env, *config, f"--workdir={tmp_path / 'run'}", *args, timeout=120)
  assert r.returncode == 2, describe(r)
  assert expect in error_line(r.stderr)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_unusable_workdir_is_one_error_line(env, tmp_path):
  (tmp_path / "file").write_text("not a directory")
  wd = tmp_path / "file" / "run"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", timeout=120)
  assert r.returncode == 2, describe(r)
  line = error_line(r.stderr)
  assert "Not a directory" in line and f"'{wd}'" in line  # the path, quotes intact
  r = train(env, f"--config={write_config(tmp_path)}", timeout=120)
  assert r.returncode == 2 and "--workdir is required" in error_line(r.stderr)


@pytest.mark.parametrize("args, expect", [
    (["--config.model.scan_layers=False"], "does not match the configured model"),
    (["--config.model.name=qwen_vl_tiny"], "does not fit model qwen_vl_tiny"),
    # Stage-2 checkpoints hold no optimizer moments for the frozen resampler/pos_embed; unfreezing it cannot resume.
    (["--config.optim.freeze=()"], "arrays missing, e.g. opt_state/"),
], ids=["scan-layers", "other-model", "optimizer-state"])
def test_incompatible_checkpoint_is_one_error_line(reference, env, tmp_path, args, expect):
  wd = tmp_path / "run"
  wd.mkdir()
  src = reference["workdir"]
  for name in ("tokenizer.model", "config.json"):
    shutil.copy(os.path.join(src, name), wd / name)
  shutil.copytree(os.path.join(src, "checkpoints", str(TOTAL)), wd / "checkpoints" / str(TOTAL))
  config_before = (wd / "config.json").read_text()
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", *REF_OVERRIDES, *args,
            "--config.optim.total_steps=20")
  assert r.returncode == 2, describe(r)
  assert expect in error_line(r.stderr)
  assert checkpoint_steps(wd) == [TOTAL] and not os.path.exists(wd / "metrics.jsonl")
  assert (wd / "config.json").read_text() == config_before  # the run's record is not overwritten by the reject


# --- dry run --------------------------------------------------------------------------------------------------------

def test_dry_run_memory_plan_of_the_stage_configs(env):
  procs = {s: subprocess.Popen([sys.executable, "train.py", f"--config=configs/{s}.py", "--dry_run",
                                "--config.mesh.fsdp=64"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
           for s in ("stage1_pretrain", "stage2_multitask", "stage3_sft")}
  plan = {}
  for s, p in procs.items():
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    total = re.search(r"qwen_vl_7b: ([\d,]+) parameters \(([\d.]+) GiB as float32\); mesh data=1 fsdp=64 tensor=1 "
                      r"\(64 devices\)", out)
    per = re.search(r"per device: params ([\d.]+) GiB \+ optimizer state ([\d.]+) GiB = ([\d.]+) GiB", out)
    assert total and per, out
    plan[s] = {"n": int(total.group(1).replace(",", "")), "total": float(total.group(2)),
               "params": float(per.group(1)), "opt": float(per.group(2)), "sum": float(per.group(3))}
  s1, s2, s3 = plan["stage1_pretrain"], plan["stage2_multitask"], plan["stage3_sft"]
  for p in plan.values():
    assert p == dict(p, n=s2["n"], total=s2["total"], params=s2["params"])  # same model, same sharding
    assert p["sum"] == pytest.approx(p["params"] + p["opt"], abs=2e-3)
  assert 9.0e9 < s2["n"] < 10.0e9  # Qwen-VL: 7.7B LLM + 1.9B ViT and adapter
  assert s2["total"] == pytest.approx(s2["n"] * 4 / 2 ** 30, abs=0.01)
  assert s2["params"] == pytest.approx(s2["total"] / 64, rel=0.02)  # FSDP over 64 devices
  assert s2["opt"] == pytest.approx(2 * s2["params"], rel=0.02)  # Adam: mu and nu for (nearly) everything
  assert s1["opt"] < s3["opt"] < s2["opt"]  # stage 1 freezes the LLM, stage 3 only the ViT
  assert s1["opt"] == pytest.approx(2 * 1.9e9 * 4 / 2 ** 30 / 64, rel=0.1)  # the ViT + adapter only
  assert s3["opt"] + s1["opt"] == pytest.approx(s2["opt"], rel=0.02)


# --- observability --------------------------------------------------------------------------------------------------

def read_events(event_dir) -> list:
  """The Event protos of the TensorBoard event files, oldest file first (TFRecord framing)."""
  from tensorboardX.proto.event_pb2 import Event
  files = sorted(glob.glob(os.path.join(str(event_dir), "events.out.tfevents.*")), key=os.path.getmtime)
  assert files, f"no event files in {event_dir}"
  events = []
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  return events


def read_scalars(event_dir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalar summaries."""
  out: dict[str, dict[int, float]] = {}
  for event in read_events(event_dir):
    for v in event.summary.value:
      out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def session_starts(event_dir) -> list[tuple[int, str]]:
  """(step, status) of the session-log events (a START at step s purges the events at s and after)."""
  from tensorboardX.proto.event_pb2 import SessionLog
  return [(e.step, SessionLog.SessionStatus.Name(e.session_log.status)) for e in read_events(event_dir)
          if e.HasField("session_log")]


def test_resolved_config_metrics_and_tensorboard(reference):
  wd = reference["workdir"]
  with open(os.path.join(wd, "config.json")) as f:
    c = json.load(f)
  assert c["optim"]["weight_decay"] == 0.01 and c["data"]["packing_window"] == 48  # the overrides
  assert c["model"]["name"] == "qwen_vl_demo" and c["optim"]["total_steps"] == TOTAL and c["nonfinite"] == "stop"

  logged = reference["metrics"]
  for x in logged:
    assert {"step", "last_loss", "loss", "grad_norm", "lr", "tokens_per_s", "steps_per_s", "mfu"} <= set(x), x
    assert x["loss"] == x["last_loss"]  # log.every=1: the window is that step
    throughput = ("tokens_per_s", "steps_per_s", "mfu")
    if x["step"] == 1:  # compilation: no throughput for the run's first step
      assert all(math.isnan(x[k]) for k in throughput), x
      continue
    assert all(math.isfinite(v) for v in x.values()), x
    assert x["grad_norm"] > 0 and x["tokens_per_s"] > 0 and 0 < x["mfu"] < 1
    assert 0 < x["tokens_per_s"] / x["steps_per_s"] <= BATCH * SEQ
    tasks = [k[len("loss/"):] for k in x if k.startswith("loss/")]
    assert tasks and set(tasks) <= set(TASKS), x
  # Warmup 0 -> 1e-3 over 2 steps, then cosine to 1e-4 at step 16 (logged lr = the one the step used).
  lrs = [x["lr"] for x in logged]
  assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3], rel=1e-6)
  assert all(a > b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] > 1e-4
  assert lrs[-1] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 13 / 14)), rel=1e-5)
  assert len({k for x in logged for k in x if k.startswith("loss/")}) >= 8  # most tasks show up in 16 steps

  scalars = read_scalars(os.path.join(wd, "tensorboard"))
  for tag in ("train/loss", "train/grad_norm", "train/lr"):
    assert sorted(scalars[tag]) == list(range(1, TOTAL + 1)), tag
  for tag in ("train/tokens_per_s", "train/mfu"):  # NaN (compilation step) is not written
    assert sorted(scalars[tag]) == list(range(2, TOTAL + 1)), tag
  for x in logged:
    assert scalars["train/loss"][x["step"]] == pytest.approx(x["loss"], rel=1e-6)
    for k in x:
      if k.startswith("loss/"):
        assert scalars[k][x["step"]] == pytest.approx(x[k], rel=1e-6)


# --- the demo chain -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_chain_of_three_stages(env, tmp_path):
  wd = tmp_path / "demo"
  steps = {"stage1": 3, "stage2": 2, "stage3": 2}
  r = train(env, "--config=configs/demo.py", f"--workdir={wd}", "--config.data.image_size=56",
            "--config.data.seq_len=96", "--config.data.max_images=2", "--config.data.batch_size=4",
            "--config.data.num_records=400", "--config.data.packing_window=64", "--config.optim.loss_chunk=96",
            "--config.optim.warmup_steps=1", "--config.log.every=1", "--config.log.progress=False",
            "--config.checkpoint.every=1", "--config.checkpoint.keep=5", "--config.peak_flops=1e12",
            *[f"--config.stage_overrides.{s}.optim.total_steps={n}" for s, n in steps.items()])
  assert r.returncode == 0, describe(r)
  assert [ln for ln in r.stdout.splitlines() if ln.startswith("===")] == ["=== stage1 ===", "=== stage2 ===",
                                                                        "=== stage3 ==="]
  assert os.path.isfile(wd / "tokenizer.model")  # trained once, shared by the stages
  with open(wd / "results.json") as f:
    results = json.load(f)
  assert sorted(results) == ["stage1", "stage2", "stage3"]
  for s, n in steps.items():
    assert results[s]["step"] == n and not results[s]["stopped_by_signal"]
    assert checkpoint_steps(wd / s) == list(range(1, n + 1))
    assert [x["step"] for x in metrics(wd / s)] == list(range(1, n + 1))
    assert not os.path.exists(wd / s / "tokenizer.model")
  logs = r.stdout + r.stderr
  assert f"initialised from {wd / 'stage1'} (step 3)" in logs and f"initialised from {wd / 'stage2'} (step 2)" in logs
  configs = {s: json.loads((wd / s / "config.json").read_text()) for s in steps}
  assert configs["stage1"]["data"]["mode"] == "pretrain" and configs["stage2"]["data"]["mode"] == "chat"
  assert configs["stage2"]["init"] == {"source": "checkpoint", "path": str(wd / "stage1")}

  # Step 1 runs at lr 0 (warmup from 0), so a stage's checkpoint 1 holds the weights it started from.
  s1_start, s1_end = (subtree(load_state(wd / "stage1", k), "params/") for k in (1, 3))
  s2_start, s2_end = (subtree(load_state(wd / "stage2", k), "params/") for k in (1, 2))
  s3_end = subtree(load_state(wd / "stage3", 2), "params/")

  def part(params, prefixes):
    return {k: v for k, v in params.items() if k.split("/")[1] in prefixes}

  def changed(a, b, prefixes):  # the fraction of those arrays that differ
    keys = part(a, prefixes)
    return sum(not np.array_equal(a[k], b[k]) for k in keys) / len(keys)
  llm, vit = ("wte", "decoder", "lm_head"), ("visual",)
  # The demo's stage 1 trains the LLM too (it starts random; configs/stage1_pretrain.py freezes it, as the paper).
  assert changed(s1_start, s1_end, llm) > 0.9 and changed(s1_start, s1_end, vit) > 0.9
  assert_identical(s2_start, s1_end)  # stage 2 starts from stage 1's last checkpoint
  assert changed(s2_start, s2_end, llm) > 0.9 and changed(s2_start, s2_end, vit) > 0.9  # and trains it all
  assert_identical(part(s3_end, vit), part(s2_end, vit))  # stage 3 froze the ViT
  assert changed(s2_end, s3_end, llm) > 0.9
  assert_identical({k: v for k, v in s3_end.items() if "pos_embed" in k and "resampler" in k},
                   {k: v for k, v in s1_start.items() if "pos_embed" in k and "resampler" in k})  # fixed 2D sincos
