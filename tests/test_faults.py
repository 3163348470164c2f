"""Faults a long run meets, injected on purpose: data that never yields a sample, SIGTERM at every phase of a run
(imports, start-up, waiting for data), a NaN before the first checkpoint, a damaged newest checkpoint, kill -9 while
restoring, saving, committing and deleting checkpoints, a full disk while saving. Each ends in one clear line and
exit 0 (signals) or 2 (errors), never a hang, and an interrupted run resumes bit-identically. Bad input files and
text: test_fault_inputs.py."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from train_runs import (
  REF_OVERRIDES,
  ROOT,
  TOTAL,
  assert_identical,
  checkpoint_steps,
  describe,
  error_line,
  load_state,
  metrics,
  train,
  write_config,
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_worker.py")


def worker(env, mode, *args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, WORKER, mode, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def test_data_that_never_yields_a_sample_is_one_error_after_one_pass(env, tmp_path):
  """Every sample longer than seq_len and dropped: one pass over the records, then `error:`; the skip warnings are
  capped (the first 20 of a kind), not megabytes."""
  wd = tmp_path / "run"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", "--config.data.seq_len=12",
            "--config.data.truncation=drop", "--config.data.num_records=60", "--config.optim.loss_chunk=12",
            timeout=300)
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, describe(r)
  line = errors[0]  # after the data's own end-of-epoch count line
  assert "no usable sample in a whole pass over the 60 records" in line and "dropped_too_long" in line, line
  assert len(r.stderr) < 20_000 and checkpoint_steps(wd) == [], describe(r)


def test_sigterm_while_waiting_for_data_saves_the_last_step_and_resumes_exactly(reference, env, tmp_path):
  wd = tmp_path / "run"
  cfg = write_config(tmp_path)
  r = worker(env, "data=6", f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES)
  assert r.returncode == 0 and "data stalls after 6 batches" in r.stdout, describe(r)
  assert "SIGTERM while waiting for data: saved step 6, exiting" in r.stdout, describe(r)
  assert checkpoint_steps(wd) == [4, 6] and metrics(wd)[-1]["step"] == 6
  r = train(env, f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES)
  assert r.returncode == 0 and "resumed from step 6" in r.stdout, describe(r)
  assert [m["last_loss"] for m in metrics(wd)] == [reference["losses"][s] for s in range(1, TOTAL + 1)]
  assert_identical(load_state(wd, TOTAL), load_state(reference["workdir"], TOTAL))


def test_sigterm_during_start_up_exits_0_having_saved_nothing(env, tmp_path):
  wd = tmp_path / "run"
  r = worker(env, "startup", f"--config={write_config(tmp_path)}", f"--workdir={wd}", timeout=300)
  assert r.returncode == 0 and "SIGTERM during start-up: exiting, nothing new saved" in r.stdout, describe(r)
  assert checkpoint_steps(wd) == [] and not metrics(wd)
  # and before the training loop exists at all: during train.py's imports
  p = subprocess.Popen([sys.executable, "train.py", f"--config={write_config(tmp_path)}", f"--workdir={wd}"],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(0.5)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0 and "SIGTERM during start-up: exiting, nothing new saved" in out, out + err
  assert checkpoint_steps(wd) == []


def test_sigterm_inside_a_gc_callback_during_imports_still_exits(env):
  """A signal handler may run inside a gc callback (jax registers one), where a raised SystemExit is only reported
  as unraisable and the import goes on: train.py's start-up handler must end the process all the same."""
  code = ("import gc, os, signal, runpy, sys; sys.argv = ['train.py']; runpy.run_path('train.py', run_name='x'); "
          "gc.callbacks.append(lambda *a: os.kill(os.getpid(), signal.SIGTERM)); gc.collect(); "
          "import time; time.sleep(1); print('went on')")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "SIGTERM during start-up: exiting" in r.stdout and "went on" not in r.stdout, describe(r)


def test_tensorstore_futures_never_retrieved_after_a_failed_read_are_not_logged(caplog):
  """After a failed restore TensorStore's other reads end as futures nobody awaits, which asyncio logs at exit
  ("Future exception was never retrieved", no Orbax frame): dropped, so the run's error stays its last line;
  another never-retrieved future is still logged."""
  import asyncio
  import gc

  from qwenvl_jax.train import checkpointing
  checkpointing._quiet_orbax_failures()  # what every TrainCheckpointer installs
  loop = asyncio.new_event_loop()
  for text in ("OUT_OF_RANGE: Error reading \"mu.bias/0.0\" in OCDBT database at local file \"/x/16/state/\"",
               "an unrelated failure"):
    f = loop.create_future()
    f.set_exception(ValueError(text))
    del f
    gc.collect()
  loop.close()
  logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(logged) == 1 and "an unrelated failure" in logged[0], logged


def test_a_nan_before_any_checkpoint_says_so(env, tmp_path):
  wd = tmp_path / "run"
  r = train(env, f"--config={write_config(tmp_path)}", f"--workdir={wd}", "--config.optim.lr=1e30",
            "--config.optim.min_lr=0", "--config.optim.total_steps=6", "--config.checkpoint.every=100", timeout=300)
  assert r.returncode == 2, describe(r)
  line = error_line(r.stderr)
  assert re.search(r"non-finite loss or gradient at step \d+", line) and "no checkpoint was saved before it" in line


def _truncate_largest_file(folder) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(reference, env, tmp_path):
  """Step 16's largest state file truncated and a stray empty `checkpoints/20`: both set aside with a warning
  naming them, training resumes from step 12 and ends bit-identical to the uninterrupted run. With no intact step
  left: one error line."""
  import shutil
  wd = tmp_path / "run"
  shutil.copytree(reference["workdir"], wd)
  _truncate_largest_file(wd / "checkpoints" / "16" / "state")
  (wd / "checkpoints" / "20").mkdir()
  cfg = write_config(tmp_path)
  r = train(env, f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES)
  assert r.returncode == 0 and "resumed from step 12" in r.stdout, describe(r)
  for step in (20, 16):
    assert re.search(rf"checkpoint \S+/checkpoints/{step} is damaged .* set aside as {step}\.damaged", r.stderr)
    assert (wd / "checkpoints" / f"{step}.damaged").is_dir()
  assert checkpoint_steps(wd)[-1] == TOTAL
  assert_identical(load_state(wd, TOTAL), load_state(reference["workdir"], TOTAL))

  for step in checkpoint_steps(wd):  # now every step damaged
    _truncate_largest_file(wd / "checkpoints" / str(step) / "state")
  r = train(env, f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES, timeout=300)
  assert r.returncode == 2 and "reads back" in error_line(r.stderr), describe(r)


def _reference_until(reference, step, wd):
  """A copy of the reference run's workdir as it stood after step `step` (later checkpoints removed; a resumed run
  drops the later metrics lines itself)."""
  import shutil
  shutil.copytree(reference["workdir"], wd)
  for s in checkpoint_steps(wd):
    if s > step:
      shutil.rmtree(wd / "checkpoints" / str(s))
  return wd


def _resumes_identically(reference, env, cfg, wd, start, *extra):
  r = train(env, f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES, *extra)
  assert r.returncode == 0 and f"resumed from step {start}" in r.stdout, describe(r)
  assert [m["last_loss"] for m in metrics(wd)] == [reference["losses"][s] for s in range(1, TOTAL + 1)]
  assert_identical(load_state(wd, TOTAL), load_state(reference["workdir"], TOTAL))


@pytest.mark.slow
def test_kill_9_during_restore_async_save_and_commit_resumes_bit_identically(reference, env, tmp_path):
  """SIGKILL at three moments, one after the other on one workdir: while step 12 is read back, while step 16's
  arrays are being written (async save), and when step 16 is written but its folder not yet renamed into place.
  None leaves a checkpoint behind that is not whole; the run then resumes from step 12 and ends bit-identical to
  the uninterrupted one."""
  wd, cfg = _reference_until(reference, 12, tmp_path / "run"), write_config(tmp_path)
  for mode, moment in (("kill-in-restore", "while restoring step 12"),
                       ("kill-in-save=16", "during the async save of step 16"),
                       ("kill-in-commit=16", "before step 16's folder is renamed into place")):
    r = worker(env, mode, f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES)
    assert r.returncode == -signal.SIGKILL and f"SIGKILL {moment}" in r.stdout, describe(r)
    if "=16" in mode:  # the save was under way: its folder still the temporary one
      assert "'16.orbax-checkpoint-tmp" in r.stdout and "'16'" not in r.stdout, describe(r)
    assert checkpoint_steps(wd) == [4, 8, 12]
  _resumes_identically(reference, env, cfg, wd, 12)


@pytest.mark.slow
def test_kill_9_while_an_old_step_is_deleted_resumes_bit_identically(reference, env, tmp_path):
  """keep=2: saving step 12 deletes step 4; SIGKILL with that deletion half done. The half-deleted step is never
  read (a newer one is whole) and is deleted by the resumed run, which ends bit-identical."""
  wd, cfg = _reference_until(reference, 8, tmp_path / "run"), write_config(tmp_path)
  keep = "--config.checkpoint.keep=2"
  r = worker(env, "kill-in-delete", f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES, keep)
  assert r.returncode == -signal.SIGKILL and "SIGKILL while deleting step 4" in r.stdout, describe(r)
  assert checkpoint_steps(wd) == [4, 8, 12]
  _resumes_identically(reference, env, cfg, wd, 12, keep)
  assert checkpoint_steps(wd) == [12, 16]


def _file_size_limit(limit):
  def apply():
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_error_line_and_keeps_the_last_checkpoint(reference, env, tmp_path):
  """Files limited to 8 MB (the step's state file is larger): saving step 8 fails. One `error:` line naming the
  step and the newest complete one, exit 2, no traceback (none from Orbax's threads, no 'Event loop is closed'
  from TensorStore's writes finishing late); step 4 intact, and the next run resumes from it bit-identically."""
  wd, cfg = _reference_until(reference, 4, tmp_path / "run"), write_config(tmp_path)
  r = subprocess.run([sys.executable, "train.py", f"--config={cfg}", f"--workdir={wd}", *REF_OVERRIDES], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=600, preexec_fn=_file_size_limit(8 << 20))
  assert r.returncode == 2 and "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, describe(r)
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), describe(r)
  assert f"checkpoint {wd}/checkpoints/8 was not saved" in errors[0] and "File too large" in errors[0], errors[0]
  assert "the newest complete checkpoint is step 4" in errors[0]
  assert checkpoint_steps(wd) == [4]
  _resumes_identically(reference, env, cfg, wd, 4)
