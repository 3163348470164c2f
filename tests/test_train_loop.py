"""train.py end to end on a tiny config (CPU): bitwise-exact resume after SIGKILL, SIGTERM save-and-exit, NaN/Inf
stop and skip, and the logs (config.json, metrics.jsonl, TensorBoard). Every run is a `python train.py` subprocess
(helpers and the shared reference run: train_runs.py)."""

import glob
import itertools
import json
import math
import os
import re
import signal
import struct
import time

import numpy as np
import pytest
from train_runs import (
  BATCH,
  REF_OVERRIDES,
  SEQ,
  TOTAL,
  assert_identical,
  checkpoint_steps,
  describe,
  error_line,
  load_state,
  metrics,
  partial_checkpoints,
  start,
  subtree,
  train,
  write_config,
)

from qwenvl_jax.data.shapes import TASKS

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
  # between two steps the signal may find the loop waiting for the next batch: it saves the same step then
  m = re.search(r"SIGTERM(?: while waiting for data)?: saved step (\d+), exiting", out)
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

  from qwenvl_jax.convert.checkpoint import load_training_params as latest_params
  from qwenvl_jax.models.qwen_vl import FAMILY
  from qwenvl_jax.models.qwen_vl.config import get_config
  abstract = FAMILY.abstract_params(get_config("qwen_vl_demo", dtype="float32"))
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
    # answer-token accuracy next to each task's answer-token loss
    assert sorted(k[len("acc/"):] for k in x if k.startswith("acc/")) == sorted(tasks), x
    assert all(0 <= x[f"acc/{t}"] <= 1 for t in tasks), x
  # Warmup 0 -> 1e-3 over 2 steps, then cosine to 1e-4 at step 16 (logged lr = the one the step used).
  lrs = [x["lr"] for x in logged]
  assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3], rel=1e-6)
  assert all(a > b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] > 1e-4
  assert lrs[-1] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 13 / 14)), rel=1e-5)
  assert len({k for x in logged for k in x if k.startswith("loss/")}) >= 8  # most tasks show up in 16 steps

  # the profile of steps 5-6: one trace (xplane + trace viewer) where TensorBoard's Profile tab looks
  traces = glob.glob(os.path.join(wd, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces

  scalars = read_scalars(os.path.join(wd, "tensorboard"))
  for tag in ("train/loss", "train/grad_norm", "train/lr"):
    assert sorted(scalars[tag]) == list(range(1, TOTAL + 1)), tag
  for tag in ("train/tokens_per_s", "train/mfu"):  # NaN (compilation step) is not written
    assert sorted(scalars[tag]) == list(range(2, TOTAL + 1)), tag
  for x in logged:
    assert scalars["train/loss"][x["step"]] == pytest.approx(x["loss"], rel=1e-6)
    for k in x:
      if k.startswith(("loss/", "acc/")):
        assert scalars[k][x["step"]] == pytest.approx(x[k], rel=1e-6)
