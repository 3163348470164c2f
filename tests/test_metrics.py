"""Evaluation metrics against hand-computed values."""

import pytest

from qwenvl_jax.evals.metrics import (
  anls,
  answer_match,
  cider,
  exact_match,
  grounding_hit,
  iou,
  normalize_vqa_answer,
  vqa_accuracy,
)


@pytest.mark.parametrize("raw,norm", [("Two", "2"), ("the Red circle.", "red circle"), ("yes!", "yes"),
                                      ("dont know", "don't know"), ("a, b", "b"), ("1,000", "1000"),
                                      ("3.5", "3.5"), ("  Left\n", "left")])
def test_vqa_normalisation(raw, norm):
  assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy():
  """The official leave-one-annotator-out average (more cases in test_benchmarks.py); one reference: answer_match."""
  assert answer_match("Red.", "red") == 1.0 and answer_match("blue", "red") == 0.0
  refs = ["red"] * 2 + ["dark red"] * 8
  assert vqa_accuracy("red", refs) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
  assert vqa_accuracy("dark red", refs) == 1.0


def test_iou_and_grounding():
  assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
  assert grounding_hit((0, 0, 10, 10), (1, 0, 10, 10)) == 1.0
  assert grounding_hit((0, 0, 10, 10), (5, 0, 15, 10)) == 0.0 and grounding_hit(None, (0, 0, 1, 1)) == 0.0


def test_anls_and_exact_match():
  assert anls("cat", ["cat"]) == 1.0 and anls("cap", ["cat"]) == pytest.approx(1 - 1 / 3)
  assert anls("dog", ["cat"]) == 0.0 and anls("Cat ", ["dog", "cat"]) == 1.0
  assert exact_match(" Cat", ["cat"]) == 1.0 and exact_match("cats", ["cat"]) == 0.0


def test_cider_rewards_matching_captions():
  refs = {i: [f"a {c} circle and a {d} square"] for i, (c, d) in
          enumerate([("red", "blue"), ("green", "red"), ("blue", "yellow"), ("purple", "green")])}
  perfect = cider({i: r[0] for i, r in refs.items()}, refs)
  shuffled = cider({i: refs[(i + 1) % 4][0] for i in refs}, refs)
  garbage = cider({i: "zzz qqq" for i in refs}, refs)
  assert perfect > 2.0 and perfect > shuffled > garbage == 0.0
  # boxes and ref tags are ignored: grounded captions are scored on their words
  assert cider({0: "<ref>a red circle</ref><box>(1,2),(3,4)</box> and a blue square"}, {0: refs[0]}) == \
      pytest.approx(cider({0: "a red circle and a blue square"}, {0: refs[0]}))
