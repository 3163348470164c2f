"""The paper's benchmarks: the official metrics on hand-computed cases, the official file formats (tiny files written
here), bad records skipped and counted, and eval.py --benchmark end to end with resume."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from qwenvl_jax.evals import benchmarks as B
from qwenvl_jax.evals import metrics as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- VQA accuracy: the official answer processing and averaging ----------------------------------------------------

@pytest.mark.parametrize("raw,norm", [
  ("dont know", "don't know"), ("Whats up", "what's up"), ("im", "im"), ("Ive", "ive"),  # capital keys never match
  ("somebody'd", "somebodyd"), ("Two dogs", "2 dogs"), ("none", "0"), ("ten 11", "10 11"),
  ("the Red car", "red car"), ("an apple a day", "apple day"), ("yes!", "yes"), ("t-shirt", "t shirt"),
  ("left - right", "left right"), ("x, y", "x y"), ("a,b", "b"), ("1,000 (approx)", "1000 approx"),
  ("3.5", "3.5"), ("5.", "5"), ("U.S.A.", "usa"), ("  Left\n", "left"), ("tab\there", "tab here"),
  ("a" + "." * 40, "a" + "." * 8),  # the official call strips at most 32 periods (re.UNICODE lands in `count`)
])
def test_vqa_answer_processing(raw, norm):
  assert M.normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_annotator_out():
  # k of 10 annotators agree: each left-out annotator leaves k (or k-1) matches; min(1, m/3) averaged over 10
  for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
    assert M.vqa_accuracy("red", ["red"] * k + ["blue"] * (10 - k)) == pytest.approx(want)
  assert M.vqa_accuracy("Two", ["2"] * 10) == 1.0 and M.vqa_accuracy("the dog.", ["dog"] * 10) == 1.0
  # the answers are punctuation-processed only when they differ (and never lower-cased or digit-mapped)
  assert M.vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
  assert M.vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
  assert M.vqa_accuracy("two", ["two"] * 5 + ["2"] * 5) == 1.0 and M.vqa_accuracy("Red", ["Red"] * 10) == 0.0
  # annotation entries are left out by comparing whole entries: identical dicts (no answer_id) leave together
  same = [{"answer": "red", "answer_confidence": "yes"}] * 4 + [{"answer": "blue", "answer_confidence": "yes"}] * 6
  assert M.vqa_accuracy("red", same) == pytest.approx(0.6)
  ided = [{"answer": e["answer"], "answer_id": i + 1} for i, e in enumerate(same)]
  assert M.vqa_accuracy("red", ided) == 1.0
  assert M.vqa_accuracy("red", ["red"]) == 0.0 and M.answer_match("Red.", "red") == 1.0  # one reference


# --- ANLS, relaxed accuracy, exact match, GQA ----------------------------------------------------------------------

def test_anls_as_the_docvqa_script():
  assert M.anls("cat", ["cat"]) == 1.0 and M.anls("cap", ["cat"]) == pytest.approx(2 / 3)
  assert M.anls("ab", ["ac"]) == 0.5 and M.anls("abc", ["xyz"]) == 0.0  # 0.5 itself is kept
  assert M.anls("  CAT ", ["dog", "cat"]) == 1.0
  # the distance is over the longer raw string: "ca  " has 4 characters -> 1 - 1/4, not 1 - 1/3
  assert M.anls("ca  ", ["cat"]) == pytest.approx(0.75)
  assert M.anls("", [""]) == 1.0 and M.anls("x", []) == 0.0


def test_chartqa_relaxed_accuracy_as_eval_mm_calls_it():
  assert M.chartqa_accuracy("10.4", "10") == 1.0 and M.chartqa_accuracy("11", "10") == 0.0
  # eval_mm passes the prediction as the target: 5% of the prediction (100 -> 105.2 is 5.2% of 100)
  assert M.chartqa_accuracy("100", "105.2") == 0.0 and M.relaxed_correctness("105.2", "100")
  assert M.chartqa_accuracy("50%", "0.5") == 1.0 and M.chartqa_accuracy(" Yes", "yes") == 1.0
  assert M.chartqa_accuracy("0", "0.0") == 0.0 and M.chartqa_accuracy("0", ["1", "0"]) == 1.0
  assert M.exact_match(" Cat", ["cat"]) == 1.0 and M.exact_match("cats", ["cat"]) == 0.0


def test_gqa_answer_cut_down_as_eval_mm():
  assert M.gqa_answer("The answer is a red car.") == "red car"
  assert M.gqa_answer("Yes, it is.") == "yes" and M.gqa_answer("left of it") == "left"
  # the official cuts in their order, quirks included: 'the ' before ' of', 'is ' inside 'this '
  assert M.gqa_answer("left of the table") == "table" and M.gqa_answer("this is an orange") == ""


# --- RefCOCO --------------------------------------------------------------------------------------------------------

def test_refcoco_box_parsing_and_scaling():
  assert M.refcoco_box("<ref>dog</ref><box>(100,200),(300,400)</box>") == (100, 200, 300, 400)
  assert M.refcoco_box("(1.5,2),(3,4e1) and (9,9),(9,9)") == (1.5, 2, 3, 40)
  for junk in ("no box", "(1,2,3),(4,5)", "(1,2),(x,4)", "(12),(3,4)"):
    assert M.refcoco_box(junk) == (0, 0, 0, 0)
  # (0,0),(999,999) is the whole 640x480 image: / 999 * width, * height
  assert M.refcoco_iou((0, 0, 999, 999), [0, 0, 640, 480], 640, 480) == 1.0
  assert M.refcoco_hit("(0,0),(999,999)", [0, 0, 640, 240], 640, 480) == 1.0  # IoU exactly 0.5
  assert M.refcoco_hit("(0,0),(999,999)", [0, 0, 640, 239], 640, 480) == 0.0
  assert M.refcoco_hit("(499,0),(999,999)", [320, 0, 640, 480], 640, 480) == 1.0
  assert M.refcoco_hit("(999,999),(0,0)", [0, 0, 640, 480], 640, 480) == 0.0  # inverted corners: a miss


# --- CIDEr ----------------------------------------------------------------------------------------------------------

def test_coco_cider_known_values():
  """Two images whose captions share no word: every n-gram has idf log(2), so a prediction equal to its reference
  scores 10 (CIDEr-D's x10, cosine 1 for n = 1..4, no length penalty) and one with no common n-gram 0."""
  refs = {1: ["a red car parked outside"], 2: ["two dogs run on grass"]}
  assert M.coco_cider({1: "A red car, parked outside!", 2: "Two dogs run on grass."}, refs) == pytest.approx(10.0)
  assert M.coco_cider({1: "a red car parked outside", 2: "one big cat sleeps inside"}, refs) == pytest.approx(5.0)
  assert M.ptb_tokens_python("A man's dog, running (fast)!") == "a man 's dog running -lrb- fast -rrb-"
  assert M.ptb_tokens_python('They don\'t "see" it...') == "they do n't see it"


# --- the official files ---------------------------------------------------------------------------------------------

def _image(path, color=(200, 30, 30)):
  PIL.Image.new("RGB", (64, 48), color).save(path)


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_every_format_reads_prompts_and_scores(tmp_path):
  _image(tmp_path / "a.png")
  cap = {"images": [{"id": 7, "image": "a.png"}, {"id": 8, "image": "gone.png"}, {"id": 9, "image": "a.png"}],
         "annotations": [{"image_id": 7, "caption": "a red square"}, {"image_id": 7, "caption": "red box"},
                         {"image_id": 8, "caption": "x"}]}
  (tmp_path / "cap.json").write_text(json.dumps(cap))
  ex, files, skipped = B.read(B.get("flickr30k"), str(tmp_path / "cap.json"), str(tmp_path))
  assert [e.id for e in ex] == ["7"] and skipped == 2 and files["7"] == str(tmp_path / "a.png")  # no image; no refs
  assert ex[0].base == "<img>a.png</img>Describe the image in English:" and ex[0].ref == ["a red square", "red box"]

  vqa = _jsonl(tmp_path / "vqa.jsonl", [
      {"question_id": 1, "image": "a.png", "question": "What color?", "answer": "red"},
      {"question_id": 2, "image": "a.png", "question": "Shape?", "answer": ["square", "box"]},
      {"question_id": 3, "image": "a.png", "question": "Size?"}, "not json", [1, 2]])
  ex, _, skipped = B.read(B.get("docvqa"), vqa, str(tmp_path))
  assert [e.ref for e in ex] == [["red"], ["square", "box"]] and skipped == 3
  assert ex[0].base == "<img>a.png</img>What color? Answer:" and ex[0].chat.startswith("What color?\n")
  preds = [{"id": e.id, "prediction": p, "ref": e.ref} for e, p in zip(ex, ["Red", "bax"])]
  assert B.score(B.get("docvqa"), preds)["anls"] == pytest.approx((1 + 2 / 3) / 2)
  assert B.score(B.get("ocrvqa"), preds) == {"accuracy": 0.5, "score": 50.0, "n": 2}
  # VQA accuracy needs the annotators' answers: from --annotations, else a list in the record
  ann = {"annotations": [{"question_id": 1, "answers": [{"answer": "red", "answer_id": i} for i in range(10)]}]}
  (tmp_path / "ann.json").write_text(json.dumps(ann))
  ex, _, skipped = B.read(B.get("textvqa"), vqa, str(tmp_path), str(tmp_path / "ann.json"))
  assert [e.id for e in ex] == ["1", "2"] and skipped == 3 and len(ex[0].ref) == 10
  with pytest.raises(B.BenchmarkFileError, match="vqa.jsonl:1: one answer only.*--strict"):
    B.read(B.get("vqav2"), vqa, str(tmp_path), strict=True)

  ref = _jsonl(tmp_path / "ref.jsonl", [
      {"image": "a.png", "sent": "the red square", "bbox": [0, 0, 32, 48], "width": 64, "height": 48},
      {"image": "a.png", "sent": "no box", "width": 64, "height": 48}])
  ex, _, skipped = B.read(B.get("refcoco"), ref, str(tmp_path))
  assert ex[0].base == "<img>a.png</img><ref>the red square</ref><box>" and skipped == 1
  preds = [{"id": ex[0].id, "prediction": "(0,0),(499,999)</box>", "ref": ex[0].ref}]
  assert B.score(B.get("refcoco"), preds)["acc@0.5"] == 1.0

  mc = _jsonl(tmp_path / "sqa.jsonl", [
      {"image": "a.png", "hint": "", "question": "Which?", "choices": ["cat", "dog", "eel"], "answer": 1},
      {"image": "a.png", "hint": "h", "question": "Which?", "choices": ["cat"], "answer": 0}])
  ex, _, skipped = B.read(B.get("scienceqa_img"), mc, str(tmp_path))
  assert ex[0].base == "<img>a.png</img>Context: N/A\nQuestion: Which?\nOptions: A. cat\nB. dog\nC. eel\nAnswer:"
  assert ex[0].choices == ["A", "B", "C"] and skipped == 1
  assert B.score(B.get("scienceqa_img"), [{"id": "x", "prediction": 1, "ref": 1},
                                          {"id": "y", "prediction": 0, "ref": 2}])["accuracy"] == 0.5
  # a whole file in another format: one error
  with pytest.raises(B.BenchmarkFileError, match="no usable refcoco record"):
    B.read(B.get("refcoco"), vqa, str(tmp_path))
  with pytest.raises(B.BenchmarkFileError, match="not a COCO caption"):
    B.read(B.get("nocaps"), vqa, str(tmp_path))


def test_shards_cover_the_examples_once():
  from qwenvl_jax.evals.bench_run import shard
  for n, count in [(10, 3), (2, 4), (7, 1)]:
    parts = [list(shard(n, i, count)) for i in range(count)]
    assert [i for part in parts for i in part] == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1


# --- the model: prompts, ranking and eval.py -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The Qwen-VL fixture model with its vocabulary padded to the shapes SentencePiece tokenizer's (image ids 215..),
  saved as a checkpoint (no random init to compile), and that tokenizer."""
  import qwenvl_jax as qv
  from qwenvl_jax.data.shapes import train_tokenizer

  d = tmp_path_factory.mktemp("bench")
  tok = train_tokenizer(str(d / "tok"), num_records=200)
  base = qv.load(os.path.join(ROOT, "tests", "fixtures", "qwen_vl_tiny"), dtype="float32", scan_layers=False)
  cfg = base.config.replace(vocab_size=1024, visual=dict(image_start_id=215))
  rng = np.random.default_rng(0)
  params = {**base.params}
  params["wte"] = {"embedding": np.concatenate([np.asarray(base.params["wte"]["embedding"]),
                                                rng.normal(0, 0.02, (1024 - 320, 256)).astype(np.float32)])}
  params["lm_head"] = {"kernel": np.concatenate([np.asarray(base.params["lm_head"]["kernel"]),
                                                 rng.normal(0, 0.02, (256, 1024 - 320)).astype(np.float32)], 1)}
  model = qv.QwenVLModel(cfg, params)
  model.save(str(d / "ckpt"))
  _image(d / "red.png")
  return model, tok, d


def test_prompts_and_ranking_on_the_model(tiny):
  from qwenvl_jax.evals.bench_run import BenchmarkRunner

  model, tok, d = tiny
  ex = B.Example("1", "red.png", B.BASE_VQA.format("red.png", "What color?"), B.CHAT_VQA.format("What color?"),
                 ["red"])
  base = BenchmarkRunner(model, tok, B.get("textvqa"), "base")
  ids, vision = base.prompt_of(ex, str(d / "red.png"))
  # (this tokenizer keeps no path bytes in the image span, so the path decodes empty)
  assert tok.decode(ids) == "<img></img>What color? Answer:" and vision["pixel_values"].shape == (1, 3, 112, 112)
  assert base.stops == [tok.eod_id] and base.max_new_tokens == 10
  chat = BenchmarkRunner(model, tok, B.get("textvqa"), "chat")
  ids, _ = chat.prompt_of(ex, str(d / "red.png"))
  text = tok.decode(ids)
  assert "Picture 1: <img></img>\nWhat color?\nAnswer the question" in text
  assert text.endswith("<|im_start|>assistant\n")
  # ranking: the choice with the lowest mean loss of its tokens after the prompt, as computed by hand here
  mc = B.get("scienceqa_img")
  runner = BenchmarkRunner(model, tok, mc, "base")
  prompt = runner.prompt_of(B.Example("q", "red.png", B.BASE_MC.format("red.png", "N/A", "Q?", "A. x\nB. y"), "",
                                      0, ["A", "B"]), str(d / "red.png"))
  losses = []
  for letter in "AB":
    target = tok.encode(" " + letter)
    logits = np.asarray(model.logits(np.asarray([prompt[0] + target]), None, **prompt[1]), np.float64)[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    losses.append(-np.mean([logp[len(prompt[0]) - 1 + k, t] for k, t in enumerate(target)]))
  assert runner.rank(prompt, ["A", "B"]) == int(np.argmin(losses))


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_eval_py_benchmark_two_processes_resume_and_count_skips(tiny, tmp_path):
  """textvqa in its official JSONL + annotations, over two processes: a record without an image, one without
  answers and a line that is not JSON are skipped and counted; a predictions file left by a killed one-process run
  (its last line cut) is continued: the example already predicted is not generated again; each process predicts its
  block into its own file and the primary scores all. Errors are one line."""
  import signal
  import time

  _, _, d = tiny
  answers = {1: ["preset"] * 10, 2: ["red"] * 7 + ["pink"] * 3, 3: ["x"] * 10, 5: ["red"] * 10}
  ann = {"annotations": [{"question_id": q, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(v)]}
                         for q, v in answers.items()]}
  (tmp_path / "ann.json").write_text(json.dumps(ann))
  data = _jsonl(tmp_path / "textvqa_val.jsonl", [
      {"question_id": 1, "image": "red.png", "question": "What color?", "answer": "red"},
      {"question_id": 2, "image": "red.png", "question": "Which color is it?", "answer": "red"},
      {"question_id": 3, "image": "missing.png", "question": "What?", "answer": "x"},
      {"question_id": 4, "image": "red.png", "question": "No answers anywhere?", "answer": "x"},
      "{not json",
      {"question_id": 5, "image": "red.png", "question": "What color is the picture?", "answer": "red"}])
  out = tmp_path / "out"
  out.mkdir()
  first = {"id": "1", "prediction": "preset", "ref": ann["annotations"][0]["answers"]}
  (out / "predictions.00000-of-00001.jsonl").write_text(json.dumps(first) + '\n{"id": "2", "predic')
  cmd = [sys.executable, "eval.py", "--benchmark=textvqa", f"--data={data}", f"--images={d}",
         f"--annotations={tmp_path / 'ann.json'}", f"--checkpoint={d / 'ckpt'}", f"--tokenizer={d / 'tok.model'}",
         f"--out={out}", "--batch_size=2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
      procs.append(subprocess.Popen(cmd + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                           f"--process_id={i}"], cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True))
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
      break
    time.sleep(0.2)
  for p in procs:  # a peer of a failed process would wait for it
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
    p.wait()
  text = [log.read_text() for log in logs]
  assert [p.returncode for p in procs] == [0, 0], text[0][-3000:] + text[1][-3000:]
  assert "textvqa_val.jsonl:4: one answer only" in text[0] and "image missing.png not found" in text[0]
  assert "textvqa_val.jsonl:5: not JSON" in text[0] and "resuming, 1 of 2" in text[0]
  assert "textvqa (base prompt): vqa_accuracy" in text[0] and "3 examples scored, 3 skipped" in text[0]
  assert "examples scored" not in text[1]  # only the primary scores
  metrics = json.loads((out / "metrics.json").read_text())
  assert metrics["n"] == 3 and metrics["skipped"] == 3 and metrics["prompt"] == "base"
  files = {f: (out / f).read_text().splitlines() for f in sorted(os.listdir(out)) if f.startswith("predictions")}
  assert [json.loads(ln)["id"] for ln in files["predictions.00000-of-00002.jsonl"]] == ["2"]
  assert [json.loads(ln)["id"] for ln in files["predictions.00001-of-00002.jsonl"]] == ["5"]
  assert files["predictions.00000-of-00001.jsonl"][0] == json.dumps(first)  # kept, not generated again
  assert json.loads((out / "run.json").read_text())["data"] == data
  preds = [json.loads(ln) for f in files.values() for ln in f if ln.endswith("}")]
  want = np.mean([M.vqa_accuracy(p["prediction"], p["ref"]) for p in preds])
  assert metrics["vqa_accuracy"] == pytest.approx(want) and metrics["vqa_accuracy"] >= 1 / 3  # "preset" scores 1
  # a bad record under --strict, a file of another benchmark, the folder of another run (here the base prompt's):
  # one error line each, before the model loads
  for args, message in (([f"--data={data}", "--strict"], "textvqa_val.jsonl:id 3: image missing.png not found"),
                        ([f"--data={data}", "--benchmark=refcoco"], "no usable refcoco record"),
                        ([f"--data={data}", "--prompt=chat"], "holds predictions of another run")):
    bad = subprocess.run(cmd[:2] + [a for a in cmd[2:] if not a.startswith("--data")] + args, check=False,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and message in errors[0], bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
