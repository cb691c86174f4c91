"""Benchmark scoring: every expected value below is worked by hand from the benchmark's rule, in the comments."""

from __future__ import annotations

import math
import os
import shutil

import pytest

from lav2 import metrics
from lav2.errors import Lav2Error
from lav2.metrics import (caption_scores, choice_scores, mme_scores, normalize_vqa_answer, parse_choice,
                          parse_yes_no, vqa_accuracy, vqa_scores)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")

# --- captions ----------------------------------------------------------------------------------------------

MAT_REFS = {"mat": ["the cat is on the mat", "there is a cat on the mat"]}

# "a dog on the mat" (5 words) against those two references, by hand:
#   closest reference length to 5 is 6, so the brevity penalty is exp(1 - 6/5) = exp(-0.2)
#   1-grams: a, on, the, mat appear in a reference, dog does not: 4/5
#   2-grams: "on the", "the mat" appear; "a dog", "dog on" do not: 2/4
#   3-grams: only "on the mat": 1/3;  4-grams: none of 2 (BLEU-4 is then ~0, pycocoevalcap's 1e-15 floor)
BP = math.exp(-0.2)
BLEU_1 = 0.8 * BP
BLEU_2 = math.sqrt(0.8 * 0.5) * BP
BLEU_3 = (0.8 * 0.5 / 3) ** (1 / 3) * BP
# ROUGE-L: longest common subsequences 3 ("on the mat") and 4 ("a on the mat"): best precision 4/5, best
# recall max(3/6, 4/7) = 4/7; F with beta 1.2: (1 + 1.44) P R / (R + 1.44 P)
ROUGE_L = 2.44 * 0.8 * (4 / 7) / (4 / 7 + 1.44 * 0.8)


def check_mat_scores(scores):
    assert scores["Bleu_1"] == pytest.approx(BLEU_1, rel=1e-6)
    assert scores["Bleu_2"] == pytest.approx(BLEU_2, rel=1e-6)
    assert scores["Bleu_3"] == pytest.approx(BLEU_3, rel=1e-6)
    assert scores["Bleu_4"] < 1e-3
    assert scores["ROUGE_L"] == pytest.approx(ROUGE_L, rel=1e-6)


# Two images whose captions share no 4-word phrase: a prediction equal to its reference has, for every n,
# an n-gram vector equal to the reference's (cosine 1, no length penalty), so CIDEr = 10 * mean over n of 1.
# A prediction sharing no word with its references scores 0, so the corpus CIDEr of one of each is 5.
SHAPES = {"circle": ["a red circle on a grey ground"], "square": ["one blue square in white light"]}


@needs_java
def test_caption_scores_with_java_are_comparable(capfd):
    # One corpus of three images (METEOR's Java start is slow): the mat prediction above, plus both SHAPES
    # predicted exactly (7 and 6 words, every n-gram matching). BLEU sums the counts over the corpus:
    #   words 5 + 7 + 6 = 18 against closest reference lengths 6 + 7 + 6 = 19: penalty exp(1 - 19/18)
    #   1-grams (4 + 7 + 6) / 18 = 17/18;  2-grams (2 + 6 + 5) / (4 + 6 + 5) = 13/15
    predictions = {"mat": "A dog, on the mat!", "circle": "A red circle on a grey ground.",
                   "square": "One blue square in white light"}  # PTB drops case and punctuation
    scores = caption_scores({**MAT_REFS, **SHAPES}, predictions)
    penalty = math.exp(1 - 19 / 18)
    assert scores["Bleu_1"] == pytest.approx(17 / 18 * penalty, rel=1e-6)
    assert scores["Bleu_2"] == pytest.approx(math.sqrt(17 / 18 * 13 / 15) * penalty, rel=1e-6)
    assert scores["ROUGE_L"] == pytest.approx((ROUGE_L + 1 + 1) / 3, rel=1e-6)  # the mean over images
    assert 0.5 < scores["METEOR"] < 1  # two perfect matches (1 each) and a partial one
    assert scores["comparable"] is True and "note" not in scores
    assert "PTBTokenizer" not in capfd.readouterr().err  # java's chatter stays out of the run's output


def test_caption_scores_without_java_say_they_are_not_comparable(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    scores = caption_scores(MAT_REFS, {"mat": "A dog, on the mat!"})
    check_mat_scores(scores)  # the plain tokenisation drops case and punctuation too
    assert scores["comparable"] is False and "METEOR" not in scores
    assert "Java" in scores["note"] and "not comparable" in scores["note"]
    half = caption_scores(SHAPES, {"circle": "a red circle on a grey ground", "square": "seven green dogs"})
    assert half["CIDEr"] == pytest.approx(5.0)
    assert half["ROUGE_L"] == pytest.approx(0.5)  # 1 for the perfect one, 0 for the other


def test_caption_scores_with_a_broken_java_are_one_line(tmp_path, monkeypatch):
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: could not create the Java Virtual Machine.' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(Lav2Error, match=f"the PTB tokenizer \\(run with {java}\\) gave no output for some "
                                        f"captions \\(Error: could not create the Java Virtual Machine.\\)"):
        caption_scores(MAT_REFS, {"mat": "a dog"})


def test_caption_scores_refuse_mismatched_or_empty_references(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(Lav2Error, match="one prediction per image"):
        caption_scores(MAT_REFS, {"other": "a cat"})
    with pytest.raises(Lav2Error, match="no reference captions"):
        caption_scores({"mat": []}, {"mat": "a cat"})


# --- MME ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("  NO \n", "no"), ("no.", "no"),  # "no." is not exactly "no": found in the first 4 chars
    ("Yes, there is a dog.", "yes"), ("Not sure", "no"),  # MME's rule reads "no" in "Not "
    ("There is no dog", "other"),  # "ther": neither
    ("I think yes", "other"),
])
def test_parse_yes_no_follows_mme(text, parsed):
    assert parse_yes_no(text) == parsed


def test_mme_scores_by_hand():
    rows = [
        # existence: image 1 both right; image 2 one of two -> acc 3/4 = 75, acc+ 1/2 = 50, score 125
        ("existence", "e1", "yes", "Yes"), ("existence", "e1", "no", "No, there is not."),
        ("existence", "e2", "yes", "yes"), ("existence", "e2", "no", "Yes"),
        # OCR: "Not sure" reads as no (wrong for a yes), "I cannot tell" is other (wrong) -> 0 + 0
        ("OCR", "o1", "Yes", "Not sure"), ("OCR", "o1", "No", "I cannot tell"),
        # code_reasoning: both right -> 100 + 100
        ("code_reasoning", "c1", "yes", "yes"), ("code_reasoning", "c1", "no", "no"),
    ]
    scores = mme_scores(rows)
    existence = scores["subtasks"]["existence"]
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert (existence["questions"], existence["images"]) == (4, 2)
    assert scores["subtasks"]["OCR"]["score"] == 0.0 and scores["subtasks"]["OCR"]["other"] == 1
    assert scores["perception"] == 125.0  # existence + OCR
    assert scores["cognition"] == 200.0  # code_reasoning
    assert "existence" not in scores["missing"] and "count" in scores["missing"] and len(scores["missing"]) == 11


# --- multiple choice ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, n, index", [
    ("B", 4, 1), ("B.", 4, 1), (" C \n", 4, 2), ("B. a magnet", 4, 1),
    ("The answer is C.", 4, 2), ("Both are metals. The answer is A", 4, 0),
    ("A. no, I mean: The answer is B.", 4, 0),  # the leading letter comes first, as in LLaVA's scorer
    ("The answer is A. The answer is B.", 4, None),  # ScienceQA's pattern must occur exactly once
    ("The answer is Blue.", 4, None), ("E", 3, None), ("b", 4, None), ("", 4, None), ("I think (A)", 4, None),
])
def test_parse_choice_follows_scienceqa(text, n, index):
    assert parse_choice(text, n) == index


def test_choice_scores_by_hand():
    rows = [(0, "A", 2, "physics"), (1, "The answer is A.", 2, "physics"), (2, "C. a fish", 3, "biology"),
            (1, "not sure", 2, None)]
    scores = choice_scores(rows)
    # right: rows 1 and 3 of 4 -> 50%; physics 1/2, biology 1/1; one answer has no letter
    assert scores == {"accuracy": 50.0, "correct": 2, "count": 4, "unparsed": 1,
                      "categories": {"biology": {"accuracy": 100.0, "count": 1},
                                     "physics": {"accuracy": 50.0, "count": 2}}}


# --- VQA ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, normal", [
    ("Two dogs.", "2 dogs"),  # period dropped, lower case, number word to digit
    ("The cat", "cat"), ("an apple", "apple"),  # articles dropped
    ("dont know", "don't know"), ("don't", "don't"),  # contraction table; the apostrophe is not punctuation
    ("3.5", "3.5"),  # a period before a digit stays
    ("yes, it is", "yes it is"),  # punctuation next to a space is removed
    ("red,blue", "red blue"),  # ... elsewhere it becomes a space
    ("1,000 (about)", "1000 about"),  # a digit-comma-digit anywhere: all punctuation removed
    ("black-and-white", "black and white"), ("Hello\nworld?", "hello world"), ("none", "0"),
])
def test_normalize_vqa_answer_follows_vqaeval(text, normal):
    assert normalize_vqa_answer(text) == normal


def test_vqa_soft_accuracy_by_hand():
    answers = ["2"] * 3 + ["3"] * 7
    # "two" -> "2" matches 3 humans. Leaving out one of those 3: 2 others match -> 2/3; leaving out one of the
    # 7: 3 match -> 1. Mean (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("3", answers) == 1.0  # 7 humans: every subset has at least 6
    assert vqa_accuracy("four", answers) == 0.0
    # one matching human: leaving it out gives 0, leaving out any of the 9 others gives 1/3 -> 9/3/10 = 0.3
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # three answers, two match: leave out a "cat": 1 match -> 1/3 (twice); leave out "dog": 2 -> 2/3; mean 4/9
    assert vqa_accuracy("A cat.", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("Cat", ["cat"]) == 1.0 and vqa_accuracy("dog", ["cat"]) == 0.0  # one answer: exact


def test_vqa_scores_by_hand():
    rows = [(["yes"] * 10, "Yes", "yes/no"), (["2"] * 3 + ["3"] * 7, "two", "number"), (["red"] * 10, "blue", "other")]
    scores = vqa_scores(rows)
    assert scores["accuracy"] == pytest.approx(100 * (1 + 0.9 + 0) / 3)
    assert scores["answer_types"]["number"] == {"accuracy": pytest.approx(90.0), "count": 1}
    assert scores["count"] == 3
    with pytest.raises(Lav2Error, match="at least one human answer"):
        vqa_accuracy("yes", [])
