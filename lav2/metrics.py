"""Benchmark scoring, no model: COCO caption metrics, MME, multiple choice (ScienceQA), VQAv2 soft accuracy.

Each scorer follows the rule its benchmark's own evaluation code applies, so that a number here can be set
beside a published one: pycocoevalcap for captions, MME's eval_tool/calculation.py, the ScienceQA and LLaVA
answer-letter parsing, and GT-Vision-Lab/VQA's vqaEval.py. Where we depart from a tool (a crash it would hit,
a random fallback), the docstring says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from lav2.errors import Lav2Error

# --- captions ----------------------------------------------------------------------------------------------

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
NO_JAVA = ("no Java runtime (`java` is not on PATH), which the PTB tokenizer and METEOR need: METEOR is missing "
           "and BLEU, ROUGE_L, CIDEr use a plain lower-case tokenisation, so they are not comparable with "
           "published numbers; install Java (e.g. `apt-get install default-jre-headless`) for those")


def plain_tokens(text: str) -> str:
    """Lower-case words, punctuation dropped: the stand-in for the PTB tokenizer when there is no Java."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def caption_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict:
    """BLEU-1..4, METEOR, ROUGE_L and CIDEr (CIDEr-D) of one predicted caption per image, as pycocoevalcap's
    COCOEvalCap computes them: PTB-tokenized, corpus-level BLEU, IDF over these references. Values are
    pycocoevalcap's (0-1; CIDEr 0-10). `comparable` says whether they can be set beside published numbers:
    without Java, METEOR is left out and the rest use `plain_tokens` (`note` says so)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(predictions):
        raise Lav2Error(f"caption scores need one prediction per image: {len(set(references) ^ set(predictions))} "
                        f"images have a prediction or references but not both")
    if not references:
        raise Lav2Error("no captions to score")
    empty = next((key for key, refs in references.items() if not refs), None)
    if empty is not None:
        raise Lav2Error(f"image {empty!r} has no reference captions; every image needs at least one")
    java = shutil.which("java") is not None
    if java:
        refs = _ptb_tokenize(references)
        preds = _ptb_tokenize({key: [predictions[key]] for key in references})
    else:
        refs = {key: [plain_tokens(c) for c in captions] for key, captions in references.items()}
        preds = {key: [plain_tokens(predictions[key])] for key in references}
    bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, 1)}
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(refs, preds)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(refs, preds)[0])
    scores["CIDEr"] = float(Cider().compute_score(refs, preds)[0])
    scores["comparable"] = java
    if not java:
        scores["note"] = NO_JAVA
    return scores


def _ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTB tokenizer (Stanford CoreNLP through `java`), its failures turned into one line. Java's
    progress and warnings, which would land between our progress bar and table, are kept for that line."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    with tempfile.TemporaryFile() as log, _stderr_to(log):
        try:
            tokens = ptbtokenizer.PTBTokenizer().tokenize({k: [{"caption": c} for c in v]
                                                           for k, v in captions.items()})
        except OSError as e:  # it writes its input file beside its jar, inside the installed package
            raise Lav2Error(f"pycocoevalcap's PTB tokenizer could not run ({e}); it needs to write into "
                            f"{Path(ptbtokenizer.__file__).parent}: install lav2 where you can write (a virtual "
                            f"environment)") from None
        lost = any(len(tokens.get(k, ())) != len(v) or any(plain_tokens(c) and not t for c, t in zip(v, tokens[k]))
                   for k, v in captions.items())  # a caption with words has tokens: else java failed
        if lost:
            log.seek(0)
            said = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
            raise Lav2Error(f"the PTB tokenizer (run with {shutil.which('java')}) gave no output for some captions"
                            f"{f' ({said[-1]})' if said else ''}; check that `java -version` works")
    return tokens


@contextlib.contextmanager
def _stderr_to(file) -> Iterator[None]:
    """Point file descriptor 2, which child processes inherit, at `file` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --- MME ---------------------------------------------------------------------------------------------------

# MME's subtask names and its two totals, as its eval_tool/calculation.py lists them.
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(text: str) -> str:
    """MME's answer parsing: "yes" or "no" as the whole lower-cased answer, else whichever of them occurs in its
    first four characters ("yes" first), else "other" (counted wrong). So "Yes, there is" is yes and "Not
    sure" is no, as in MME's tool. We strip surrounding whitespace first, as the pipelines writing MME's
    result files do."""
    answer = text.strip().lower()
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows: Iterable[tuple[str, str, str, str]]) -> dict:
    """MME's scores from (subtask, image, truth "yes"/"no", model answer) rows.

    Per subtask: acc (percent of questions right), acc_plus (percent of images whose questions are all right;
    MME has two per image) and score = acc + acc_plus (0-200). `perception` and `cognition` sum the scores of
    MME's 10 perception and 4 cognition subtasks; `missing` lists those of the 14 with no rows (the totals then
    cover fewer subtasks than a published MME total). Subtasks outside the 14 are scored but in no total.
    """
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, bool]] = defaultdict(dict)  # subtask -> image -> all right so far
    other: dict[str, int] = defaultdict(int)
    for subtask, image, truth, prediction in rows:
        parsed = parse_yes_no(prediction)
        right = parsed == truth.strip().lower()
        questions[subtask].append(right)
        images[subtask][image] = images[subtask].get(image, True) and right
        other[subtask] += parsed == "other"
    if not questions:
        raise Lav2Error("no MME answers to score")
    subtasks = {}
    for name, marks in questions.items():
        acc = 100 * sum(marks) / len(marks)
        acc_plus = 100 * sum(images[name].values()) / len(images[name])
        subtasks[name] = {"score": acc + acc_plus, "acc": acc, "acc_plus": acc_plus, "questions": len(marks),
                          "images": len(images[name]), "other": other[name]}
    return {
        "perception": sum((subtasks[n]["score"] for n in MME_PERCEPTION if n in subtasks), 0.0),
        "cognition": sum((subtasks[n]["score"] for n in MME_COGNITION if n in subtasks), 0.0),
        "subtasks": subtasks,
        "missing": [n for n in MME_PERCEPTION + MME_COGNITION if n not in subtasks],
    }


# --- multiple choice (ScienceQA) ---------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_BARE_LETTER = re.compile(r"([A-Z])\.?")
_LETTER_DOT_SPACE = re.compile(r"([A-Z])\. ")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z])(?![A-Za-z])")


def parse_choice(text: str, n_options: int) -> Optional[int]:
    """The chosen option's index from free text, None when no letter can be read (counted wrong).

    In order: the whole answer is a letter, optionally with a period ("B", "B."); it starts with a letter,
    a period and a space ("B. a magnet", LLaVA's ScienceQA scorer); it says "The answer is B" exactly once
    (ScienceQA's own pattern; ours also takes it at the very end and rejects "The answer is Blue"). A letter
    past the last option counts as unreadable, as in both scorers. ScienceQA's GPT-3 script then picks a random
    option; like LLaVA's we count it wrong, so that scores are reproducible.
    """
    answer = text.strip()
    letters = LETTERS[:n_options]
    bare = _BARE_LETTER.fullmatch(answer) or _LETTER_DOT_SPACE.match(answer)
    if bare:
        letter = bare.group(1)
    else:
        found = _THE_ANSWER_IS.findall(answer)
        letter = found[0] if len(found) == 1 else None
    return letters.index(letter) if letter is not None and letter in letters else None


def choice_scores(rows: Iterable[tuple[int, str, int, Optional[str]]]) -> dict:
    """Accuracy (percent) from (answer index, model answer, number of options, category or None) rows, overall
    and per category; `unparsed` counts answers with no readable letter."""
    correct = count = unparsed = 0
    by_category: dict[str, list[bool]] = defaultdict(list)
    for truth, prediction, n_options, category in rows:
        chosen = parse_choice(prediction, n_options)
        right = chosen == truth
        correct, count, unparsed = correct + right, count + 1, unparsed + (chosen is None)
        if category is not None:
            by_category[category].append(right)
    if not count:
        raise Lav2Error("no multiple-choice answers to score")
    scores = {"accuracy": 100 * correct / count, "correct": correct, "count": count, "unparsed": unparsed}
    if by_category:
        scores["categories"] = {c: {"accuracy": 100 * sum(m) / len(m), "count": len(m)}
                                for c, m in sorted(by_category.items())}
    return scores


# --- VQAv2 -------------------------------------------------------------------------------------------------

# The tables of GT-Vision-Lab/VQA's vqaEval.py (its current version). Words are looked up after lower-casing,
# so the official table's capitalised keys ("Im", "Ive") never match and are left out, as are its identities.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not before a digit: "3.5" keeps its point


def normalize_vqa_answer(text: str) -> str:
    """VQAv2's answer normalisation: newlines and tabs to spaces, punctuation (removed where it touches a space
    or the answer has a digit-comma-digit, else made a space), periods not before a digit removed, lower case,
    number words to digits, articles dropped, contractions given their apostrophe ("dont" -> "don't")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in VQA_PUNCTUATION:
        out = out.replace(p, "" if glued or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    words = [VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2's soft accuracy of one answer, 0-1: over each leave-one-out subset of the human answers (10 in
    VQAv2), min(#matching / 3, 1), averaged. This is what the official evaluator (vqaEval.py) computes, with
    both sides normalised by `normalize_vqa_answer`: the evaluator skips normalisation when all humans agree,
    which is why submissions normalise their answers first (as LLaVA's does); VQAv2's own answers are already
    normal, so normalising them changes nothing. With fewer answers the same rule runs over what there is, so
    a perfect answer scores below 1 with two or three of them (1/3, 2/3); a single answer, which leaves no
    subset to vote, is scored by exact match."""
    if not answers:
        raise Lav2Error("a VQA question needs at least one human answer to score against")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == predicted for a in answers]
    total = sum(matches)
    if len(matches) == 1:
        return float(matches[0])
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def vqa_scores(rows: Iterable[tuple[Sequence[str], str, Optional[str]]]) -> dict:
    """VQA accuracy (percent, unrounded) from (human answers, model answer, answer type or None) rows, overall
    and per answer type (VQAv2's "yes/no", "number", "other")."""
    values: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    for answers, prediction, answer_type in rows:
        values.append(vqa_accuracy(prediction, answers))
        if answer_type is not None:
            by_type[answer_type].append(values[-1])
    if not values:
        raise Lav2Error("no VQA answers to score")
    scores = {"accuracy": 100 * sum(values) / len(values), "count": len(values)}
    if by_type:
        scores["answer_types"] = {t: {"accuracy": 100 * sum(v) / len(v), "count": len(v)}
                                  for t, v in sorted(by_type.items())}
    return scores
