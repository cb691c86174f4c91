"""`lav2 eval`: answer a benchmark's questions with a model and score the answers as the benchmark does.

Four tasks, each a reader of the benchmark's published files, a one-turn prompt and a scorer from
`lav2.metrics`: `caption` (COCO captions, the Karpathy split, or a plain list; pycocoevalcap's metrics), `mme`
(MME's folder of subtasks; acc + acc+), `choice` (ScienceQA-style multiple choice; letter accuracy) and `vqa`
(a plain list or the VQAv2 questions/annotations pair; soft accuracy). Decoding is greedy and batched.

The output folder holds `predictions.jsonl`, one line per answered item, appended as each batch finishes, and
`metrics.json`, written whole at the end. Items are keyed by a stable id, so a killed run started again with
the same --out answers only what is left and scores every item once. Items whose image is missing or
unreadable, or whose prompt the model's context cannot hold, are counted, named in one line and left out of
the score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import lav2
from lav2 import metrics
from lav2.checkpoint import Loaded, write_text_atomic
from lav2.errors import Lav2Error
from lav2.generate import Sampling, answer_batch, encode_dialog
from lav2.images import open_image
from lav2.prompts import CAPTION_INSTRUCTION, Turn
from lav2.recipe import short_path

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
MISSING, TOO_LONG = "image missing or unreadable", "too long for the model's context"  # why an item is left out
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# LLaVA-1.5's instructions for short answers, the ones its published numbers were made with.
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
VQA_INSTRUCTION = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Item:
    """One question to the model. `truth` is what the task's scorer compares with: the reference captions
    (caption), "yes"/"no" (mme), (answer index, number of options) (choice), the human answers (vqa)."""

    id: str  # stable across runs: the resume key
    question: str  # the user turn, instructions included
    image: Optional[Path]
    truth: object
    group: Optional[str] = None  # MME subtask, choice category, VQA answer type
    context: Optional[str] = None  # the turn's input (a ScienceQA hint)


# --- reading files -----------------------------------------------------------------------------------------


_BLANK = object()  # a blank JSONL line: kept in the list so that positions stay line numbers


def _load_json(path: Path) -> object:
    """A JSON file's value, or a JSONL file's lines as a list; a missing or broken file is one line."""
    if not path.is_file():
        raise Lav2Error(f"{short_path(path)}: no such data file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Lav2Error(f"{short_path(path)}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"save it as UTF-8") from None
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise Lav2Error(f"{short_path(path)} line {e.lineno} column {e.colno}: broken JSON ({e.msg})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            records.append(json.loads(line) if line.strip() else _BLANK)
        except json.JSONDecodeError as e:
            raise Lav2Error(f"{short_path(path)} line {number}: broken JSONL ({e.msg} at column {e.colno}); "
                            f"each line must be one complete JSON object") from None
    return records


class _Records:
    """The records of a JSON list or JSONL file, each with its place ("record 3", "line 4") for messages."""

    def __init__(self, path: Path, data: object, kind: str, where: Optional[str] = None):
        if not isinstance(data, list):
            raise Lav2Error(f"{short_path(path)}: expected a list of {kind} records, found a JSON "
                            f"{type(data).__name__}; see `lav2 eval --help` for the formats")
        self.path, self.data, self.where = path, data, where  # where: the list's key in its file, if any

    def __iter__(self):
        for i, record in enumerate(self.data):
            if record is _BLANK:
                continue
            if self.where is not None:
                place = f"{self.where}[{i}]"
            else:
                place = f"line {i + 1}" if self.path.suffix == ".jsonl" else f"record {i}"
            if not isinstance(record, dict):
                raise self.error(place, f"expected a JSON object, found {type(record).__name__}")
            yield place, record

    def error(self, place: str, problem: str) -> Lav2Error:
        return Lav2Error(f"{short_path(self.path)} {place}: {problem}")

    def text(self, place: str, record: dict, *keys: str, required: bool = True) -> Optional[str]:
        """The first of `keys` the record has, as a non-empty string. An optional field may be null or empty
        (ScienceQA's "hint": "", "image": null): that is None."""
        key = next((k for k in keys if record.get(k) is not None), None)
        value = None if key is None else record[key]
        if not required and (value is None or value == ""):
            return None
        if value is None:
            raise self.error(place, f"missing field {' or '.join(map(repr, keys))}")
        if not isinstance(value, str) or not value.strip():
            raise self.error(place, f"field {key!r} must be a non-empty string, not {value!r}")
        return value

    def strings(self, place: str, record: dict, key: str, *, inner: Optional[str] = None,
                empty_ok: bool = False) -> list[str]:
        """A non-empty list of strings (or of objects holding one under `inner`, as VQAv2's answers), each
        non-empty unless empty_ok (a human's blank VQA answer is data: it matches nothing)."""
        values = record.get(key)
        if not isinstance(values, list) or not values:
            raise self.error(place, f"field {key!r} must be a non-empty list")
        out = []
        for i, value in enumerate(values):
            if inner is not None and isinstance(value, dict):
                value = value.get(inner)
            if not isinstance(value, str) or not (empty_ok or value.strip()):
                raise self.error(place, f"{key}[{i}] must be a non-empty string, not {value!r}")
            out.append(value)
        return out


def _unique(items: list[Item], path: Path) -> list[Item]:
    seen = set()
    for item in items:
        if item.id in seen:
            raise Lav2Error(f"{short_path(path)}: two records have the id {item.id!r}; ids key the predictions "
                            f"of a resumable run, so each must be unique")
        seen.add(item.id)
    return items


def _record_id(record: dict, place: str, *keys: str) -> str:
    value = next((record[k] for k in keys if record.get(k) is not None), None)
    return place if value is None else str(value)


# --- caption -----------------------------------------------------------------------------------------------


def read_caption(data: Path, image_root: Path, *, split: Optional[str] = None) -> list[Item]:
    """COCO's caption annotations ({images, annotations}), the Karpathy split JSON ({images: [{filepath?,
    filename, split, sentences: [{raw}]}]}, its `split` images, "test" by default) or a list of
    {image, captions: [...]} (or "caption": "...") records, with an optional "id"."""
    raw = _load_json(data)
    images = isinstance(raw, dict) and isinstance(raw.get("images"), list)
    if images and "annotations" not in raw:
        return _read_karpathy(data, raw, image_root, split or "test")
    if split is not None:
        raise Lav2Error(f"--split picks a part of a Karpathy split JSON; {short_path(data)} is not one")
    if images and isinstance(raw.get("annotations"), list):
        return _read_coco(data, raw, image_root)
    items = []
    records = _Records(data, raw, "caption")
    for place, record in records:
        image = records.text(place, record, "image")
        if "captions" in record:
            captions = records.strings(place, record, "captions")
        else:
            captions = [records.text(place, record, "caption")]
        items.append(Item(_record_id(record, image, "id"), CAPTION_INSTRUCTION, image_root / image, tuple(captions)))
    return _unique(items, data)


def _read_coco(data: Path, raw: dict, image_root: Path) -> list[Item]:
    names = {}
    for i, image in enumerate(raw["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise Lav2Error(f"{short_path(data)} images[{i}]: needs an 'id' and a 'file_name'")
        names[image["id"]] = image["file_name"]
    captions: dict[object, list[str]] = {}
    for i, annotation in enumerate(raw["annotations"]):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("caption"), str):
            raise Lav2Error(f"{short_path(data)} annotations[{i}]: needs an 'image_id' and a 'caption' string")
        if annotation.get("image_id") not in names:
            raise Lav2Error(f"{short_path(data)} annotations[{i}]: image_id {annotation.get('image_id')!r} is not "
                            f"in the file's 'images' list")
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    # Images with no caption are not part of the evaluation (COCOEvalCap scores the images it has results for).
    return [Item(str(image_id), CAPTION_INSTRUCTION, image_root / names[image_id], tuple(refs))
            for image_id, refs in captions.items()]


def _read_karpathy(data: Path, raw: dict, image_root: Path, split: str) -> list[Item]:
    items, splits = [], set()
    for i, image in enumerate(raw["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
            raise Lav2Error(f"{short_path(data)} images[{i}]: needs a 'filename' (a Karpathy split JSON)")
        splits.add(image.get("split"))
        if image.get("split") != split:
            continue
        sentences = image.get("sentences")
        if not isinstance(sentences, list) or not sentences or \
                not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise Lav2Error(f"{short_path(data)} images[{i}]: 'sentences' must be a non-empty list of {{raw}}")
        path = image_root / image.get("filepath", "") / image["filename"]
        key = _record_id(image, image["filename"], "cocoid", "imgid")
        items.append(Item(key, CAPTION_INSTRUCTION, path, tuple(s["raw"] for s in sentences)))
    if not items:
        found = ", ".join(sorted(str(s) for s in splits))
        raise Lav2Error(f"{short_path(data)}: no images in split {split!r}; the file has {found}; "
                        f"pick one with --split")
    return _unique(items, data)


# --- MME ---------------------------------------------------------------------------------------------------


def read_mme(root: Path) -> list[Item]:
    """MME's release folder: one folder per subtask, each with one .txt per image holding its questions, a line
    "question<TAB>Yes|No" each. The txt files sit beside the images, or (artwork, celebrity, landmark, posters,
    scene) in questions_answers_YN/ with the images in images/. `root` may also be the folder above the
    subtasks' one (the archive's MME_Benchmark_release_version/)."""
    if not root.is_dir():
        raise Lav2Error(f"{short_path(root)}: not a folder; for --task mme give MME's release folder "
                        f"(the one holding existence/, count/, OCR/ ...)")
    subtasks = _mme_subtasks(root)
    if not subtasks:
        children = [p for p in root.iterdir() if p.is_dir()]
        if len(children) == 1:
            subtasks = _mme_subtasks(children[0])
    if not subtasks:
        raise Lav2Error(f"{short_path(root)}: no MME subtask folders (folders with questions_answers_YN/ or .txt "
                        f"question files, such as existence/ or OCR/); give MME's release folder")
    items = []
    for folder in subtasks:
        split = (folder / "questions_answers_YN").is_dir()
        questions = folder / "questions_answers_YN" if split else folder
        images = folder / "images" if split else folder
        for txt in sorted(questions.glob("*.txt")):
            image = next((p for p in (images / (txt.stem + s) for s in IMAGE_SUFFIXES + tuple(
                x.upper() for x in IMAGE_SUFFIXES)) if p.is_file()), images / txt.stem)
            items.extend(_mme_questions(txt, folder.name, image))
    return items


def _mme_subtasks(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_dir()
            and ((p / "questions_answers_YN").is_dir() or any(p.glob("*.txt")))]


def _mme_questions(txt: Path, subtask: str, image: Path) -> list[Item]:
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise Lav2Error(f"{short_path(txt)}: not UTF-8 text; MME's question files are UTF-8") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        question, tab, answer = line.rpartition("\t")
        if not tab or not question.strip() or answer.strip().lower() not in ("yes", "no"):
            raise Lav2Error(f"{short_path(txt)} line {number}: expected 'question<TAB>Yes' or 'question<TAB>No', "
                            f"got {line[:80]!r}")
        items.append(Item(f"{subtask}/{txt.stem}/{number}", question.strip(), image, answer.strip().lower(), subtask))
    return items


# --- multiple choice ---------------------------------------------------------------------------------------


def with_instruction(question: str, instruction: Optional[str], default: str) -> str:
    """The question and the line asking how to answer it (None: `default`; "": no line)."""
    instruction = default if instruction is None else instruction
    return f"{question}\n{instruction}" if instruction else question


def read_choice(data: Path, image_root: Path, *, instruction: Optional[str] = None) -> list[Item]:
    """Records {question, options or choices: [...], answer: a letter or a 0-based index, image?, category? or
    subject?, context? or hint?, id?}; the prompt lists the options as "A. ...", one a line, and asks for the
    letter."""
    records = _Records(data, _load_json(data), "multiple-choice")
    items = []
    for place, record in records:
        question = records.text(place, record, "question")
        key = "options" if "options" in record else "choices"
        options = records.strings(place, record, key)
        if len(options) < 2 or len(options) > len(metrics.LETTERS):
            raise records.error(place, f"field {key!r} needs 2 to {len(metrics.LETTERS)} options, has {len(options)}")
        answer = record.get("answer")
        letters = metrics.LETTERS[:len(options)]
        if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
            index = letters.index(answer.strip().upper())
        elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
            index = answer
        else:
            raise records.error(place, f"field 'answer' must be a letter {letters[0]}-{letters[-1]} or an index "
                                       f"0-{len(options) - 1}, not {answer!r}")
        image = records.text(place, record, "image", required=False)
        lines = [question, *(f"{letter}. {option}" for letter, option in zip(letters, options))]
        prompt = with_instruction("\n".join(lines), instruction, CHOICE_INSTRUCTION)
        items.append(Item(_record_id(record, place, "id"), prompt, None if image is None else image_root / image,
                          (index, len(options)), records.text(place, record, "category", "subject", required=False),
                          records.text(place, record, "context", "hint", required=False)))
    return _unique(items, data)


# --- VQA ---------------------------------------------------------------------------------------------------


def read_vqa(data: Path, image_root: Path, *, annotations: Optional[Path] = None,
             instruction: Optional[str] = None) -> list[Item]:
    """A list of {image, question, answers: [...], question_id? or id?, answer_type?} records, or VQAv2's
    questions file (its annotations file found beside it: v2_OpenEnded_mscoco_val2014_questions.json ->
    v2_mscoco_val2014_annotations.json, or given as `annotations`); VQAv2's images are COCO_<subtype>_<id>.jpg
    under `image_root`."""
    raw = _load_json(data)
    if isinstance(raw, dict) and "questions" in raw:
        return _read_vqav2(data, raw, image_root, annotations, instruction)
    if annotations is not None:
        raise Lav2Error(f"--annotations goes with a VQAv2 questions file; {short_path(data)} is not one "
                        f"(no 'questions' list)")
    records = _Records(data, raw, "VQA")
    items = []
    for place, record in records:
        question = records.text(place, record, "question")
        image = records.text(place, record, "image")
        answers = records.strings(place, record, "answers", inner="answer", empty_ok=True)
        items.append(Item(_record_id(record, place, "question_id", "id"),
                          with_instruction(question, instruction, VQA_INSTRUCTION), image_root / image, tuple(answers),
                          records.text(place, record, "answer_type", required=False)))
    return _unique(items, data)


def vqav2_annotations_path(questions: Path) -> Path:
    """Where VQAv2 keeps the annotations of a questions file: the same folder, the name without the task type."""
    name = questions.name.replace("_questions", "_annotations")
    for task_type in ("OpenEnded_", "MultipleChoice_"):
        name = name.replace(task_type, "")
    return questions.with_name(name)


def _read_vqav2(data: Path, raw: dict, image_root: Path, annotations: Optional[Path],
                instruction: Optional[str]) -> list[Item]:
    path = annotations or vqav2_annotations_path(data)
    if annotations is None and not path.is_file():
        raise Lav2Error(f"{short_path(data)} is a VQAv2 questions file but its annotations are not beside it "
                        f"(looked for {path.name}); pass --annotations FILE")
    answers_raw = _load_json(path)
    if not isinstance(answers_raw, dict) or not isinstance(answers_raw.get("annotations"), list):
        raise Lav2Error(f"{short_path(path)}: not a VQAv2 annotations file (needs an 'annotations' list)")
    subtype = raw.get("data_subtype")
    if not isinstance(subtype, str) or not isinstance(raw["questions"], list):
        raise Lav2Error(f"{short_path(data)}: a VQAv2 questions file needs 'data_subtype' (e.g. val2014) and a "
                        f"'questions' list")
    truth = _Records(path, answers_raw["annotations"], "annotation", where="annotations")
    by_question = {}
    for place, annotation in truth:
        answers = truth.strings(place, annotation, "answers", inner="answer", empty_ok=True)
        by_question[annotation.get("question_id")] = (answers, annotation.get("answer_type"))
    questions = _Records(data, raw["questions"], "question", where="questions")
    items = []
    for place, record in questions:
        question = questions.text(place, record, "question")
        if not isinstance(record.get("image_id"), int) or record.get("question_id") not in by_question:
            raise questions.error(place, f"needs an integer 'image_id' and a 'question_id' that "
                                         f"{short_path(path)} annotates")
        answers, answer_type = by_question[record["question_id"]]
        image = image_root / f"COCO_{subtype}_{record['image_id']:012d}.jpg"
        items.append(Item(str(record["question_id"]), with_instruction(question, instruction, VQA_INSTRUCTION), image,
                          tuple(answers), answer_type if isinstance(answer_type, str) else None))
    return _unique(items, data)


# --- the tasks ---------------------------------------------------------------------------------------------


def _score_caption(answered: list[tuple[Item, str]]) -> dict:
    return metrics.caption_scores({item.id: item.truth for item, _ in answered},
                                  {item.id: text for item, text in answered})


def _score_mme(answered: list[tuple[Item, str]]) -> dict:
    return metrics.mme_scores((item.group, str(item.image), item.truth, text) for item, text in answered)


def _score_choice(answered: list[tuple[Item, str]]) -> dict:
    return metrics.choice_scores((item.truth[0], text, item.truth[1], item.group) for item, text in answered)


def _score_vqa(answered: list[tuple[Item, str]]) -> dict:
    return metrics.vqa_scores((item.truth, text, item.group) for item, text in answered)


@dataclass(frozen=True)
class Task:
    """What differs between tasks once their items are read: how answers are scored, how long they may be."""

    score: Callable[[list[tuple[Item, str]]], dict]
    max_new_tokens: int  # room for the answer the prompt asks for, and a little more


TASKS = {
    "caption": Task(_score_caption, 48),
    "mme": Task(_score_mme, 10),
    "choice": Task(_score_choice, 24),
    "vqa": Task(_score_vqa, 12),
}


def read_items(task: str, data: Path, *, image_root: Optional[Path] = None, split: Optional[str] = None,
               annotations: Optional[Path] = None, instruction: Optional[str] = None) -> list[Item]:
    """The task's items from its data file (or MME folder); image paths under image_root (default: the data
    file's folder). instruction: the line after each choice or vqa question (default: the one LLaVA-style models
    are trained on; "" for none). Options that do not apply to the task are errors, not ignored."""
    if task not in TASKS:
        raise Lav2Error(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "mme" and image_root is not None:
        raise Lav2Error("--image-root does not apply to --task mme: MME keeps its images in its own folders")
    for option, value, owner in (("--split", split, "caption"), ("--annotations", annotations, "vqa")):
        if value is not None and task != owner:
            raise Lav2Error(f"{option} does not apply to --task {task}, only to --task {owner}")
    if instruction is not None and task not in ("choice", "vqa"):
        raise Lav2Error(f"--instruction does not apply to --task {task}, only to choice and vqa")
    data = Path(data)
    root = Path(image_root) if image_root is not None else data.parent
    if task == "caption":
        items = read_caption(data, root, split=split)
    elif task == "mme":
        items = read_mme(data)
    elif task == "choice":
        items = read_choice(data, root, instruction=instruction)
    else:
        items = read_vqa(data, root, annotations=annotations, instruction=instruction)
    if not items:
        raise Lav2Error(f"{short_path(data)}: no {task} items in it")
    return items


# --- predictions -------------------------------------------------------------------------------------------


def read_predictions(path: Path) -> dict[str, dict]:
    """The answers a previous run of this eval wrote, by item id. A last line cut short by a kill is dropped
    from the file (its item is answered again)."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    found = {}
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            found[str(record["id"])] = {"question": record["question"], "prediction": str(record["prediction"])}
        except (json.JSONDecodeError, KeyError, TypeError):
            raise Lav2Error(f"{short_path(path)} line {number}: not a prediction line ({{id, question, prediction}}); "
                            f"remove it, or use another --out") from None
    return found


def _check_same_questions(items: Sequence[Item], done: dict[str, dict], path: Path) -> None:
    for item in items:
        if item.id in done and done[item.id]["question"] != item.question:
            raise Lav2Error(f"{short_path(path)}: item {item.id!r} was asked another question there; those "
                            f"predictions come from another eval; use another --out")


# --- the run -----------------------------------------------------------------------------------------------


def evaluate(model: Union[str, Path, Loaded], *, task: str, data: Union[str, Path], out: Union[str, Path],
             image_root: Union[str, Path, None] = None, batch_size: int = 8, limit: Optional[int] = None,
             split: Optional[str] = None, annotations: Union[str, Path, None] = None, device: Optional[str] = None,
             dtype: Optional[str] = None, instruction: Optional[str] = None, console: Optional[Console] = None) -> dict:
    """Answer the first `limit` items (all when None) of the task's data with the model (a folder or a
    `lav2.load` result), greedily, `batch_size` at a time, and score them; writes out/predictions.jsonl and
    out/metrics.json and returns what metrics.json holds. Run again with the same `out`, it answers only
    the items without a prediction there."""
    console = console or Console()
    if batch_size < 1:
        raise Lav2Error(f"--batch-size must be at least 1, not {batch_size}")
    if limit is not None and limit < 1:
        raise Lav2Error(f"--limit must be at least 1, not {limit}")
    items = read_items(task, Path(data), image_root=None if image_root is None else Path(image_root), split=split,
                       annotations=None if annotations is None else Path(annotations), instruction=instruction)[:limit]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Lav2Error(f"--out {short_path(out)} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    predictions_path = out / PREDICTIONS_FILE
    done = read_predictions(predictions_path)
    _check_same_questions(items, done, predictions_path)
    todo = [item for item in items if item.id not in done]
    skipped = [(item, MISSING) for item in todo if item.image is not None and not item.image.is_file()]
    todo = [item for item in todo if item.image is None or item.image.is_file()]  # checked before loading
    model_name = str(model.folder if isinstance(model, Loaded) else model)
    if todo:
        loaded = model if isinstance(model, Loaded) else _load(model, device, dtype)
        skipped += _answer(loaded, task, todo, predictions_path, done, batch_size, console)
    answered = [(item, done[item.id]["prediction"]) for item in items if item.id in done]
    reasons = {reason: sum(r == reason for _, r in skipped) for reason in dict.fromkeys(r for _, r in skipped)}
    why = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
    result = {"task": task, "model": model_name, "data": str(data), "items": len(items), "scored": len(answered),
              "skipped": {"count": len(skipped), "reasons": reasons, "first": [_name(i, r) for i, r in skipped[:5]]}}
    if not answered:
        raise Lav2Error(f"no item could be scored: all {len(items)} were skipped ({why}); check --image-root "
                        f"(default: the data file's folder)")
    if skipped:
        console.print(f"{len(skipped)} of {len(items)} items skipped ({why}; first: "
                      f"{', '.join(result['skipped']['first'])}); they are not in the score")
    result["metrics"] = TASKS[task].score(answered)
    write_text_atomic(out / METRICS_FILE, json.dumps(result, indent=2) + "\n")
    if "note" in result["metrics"]:
        console.print(f"note: {result['metrics']['note']}")
    console.print(metrics_table(task, result))
    return result


def _load(model, device: Optional[str], dtype: Optional[str]) -> Loaded:
    if dtype is not None and dtype not in DTYPES:
        raise Lav2Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return lav2.load(model, device=device, dtype=None if dtype is None else getattr(torch, dtype))


def default_out(model: Union[str, Path], task: str, data: Union[str, Path]) -> Path:
    """eval/MODEL-TASK-DATA under the current folder: the same command finds its own run again to resume it."""
    return Path("eval") / f"{Path(model).name}-{task}-{Path(data).stem}"


def _name(item: Item, reason: str) -> str:
    """How a skipped item is named: its image when that is the trouble, else its id."""
    return short_path(item.image) if reason == MISSING else item.id


def _answer(loaded: Loaded, task: str, todo: list[Item], path: Path, done: dict[str, dict], batch_size: int,
            console: Console) -> list[tuple[Item, str]]:
    """Answer `todo` in batches, appending each batch's lines to `path` (and `done`) as it finishes; returns
    the items left out, each with why: an image that does not decode, a prompt the context cannot hold."""
    if loaded.config.visual_len == 0 and any(item.image is not None for item in todo):
        raise Lav2Error(f"{loaded.folder} is a text-only model (no visual branch) but the {task} items come with "
                        f"images; evaluate a multimodal model folder")
    sampling = Sampling(temperature=0, max_new_tokens=TASKS[task].max_new_tokens)
    skipped = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress, path.open("a", encoding="utf-8") as f:
        bar = progress.add_task(f"eval {task}", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            good, images, dialogs = [], [], []
            for item in batch:
                dialog = [Turn(user=item.question, input=item.context)]
                if len(encode_dialog(loaded, dialog)) + sampling.max_new_tokens > loaded.config.max_seq_len:
                    skipped.append((item, TOO_LONG))
                    continue
                try:
                    images.append(None if item.image is None else open_image(item.image))
                except Lav2Error:
                    skipped.append((item, MISSING))
                    continue
                good.append(item)
                dialogs.append(dialog)
            if good:
                answers = answer_batch(loaded, dialogs, images=images, sampling=sampling)
                for item, text in zip(good, answers):
                    f.write(json.dumps({"id": item.id, "question": item.question, "prediction": text}) + "\n")
                    done[item.id] = {"question": item.question, "prediction": text}
                f.flush()
            progress.advance(bar, len(batch))
    return skipped


# --- reporting ---------------------------------------------------------------------------------------------


def _number(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metrics_table(task: str, result: dict) -> Table:
    """The scores as a table: headline numbers first, then one row per subtask / category / answer type."""
    table = Table(title=f"{task}: {result['scored']} of {result['items']} items scored ({result['model']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    digits = 4 if task == "caption" else 2  # pycocoevalcap's 0-1 scale; percents and MME points
    for key, value in result["metrics"].items():
        if key == "note":
            continue
        if isinstance(value, dict):
            table.add_row(key, "")
            for name, part in value.items():
                main = part.get("score", part.get("accuracy"))
                count = part.get("questions", part.get("count"))
                table.add_row(f"  {name}", f"{_number(main, digits)} (n={count})")
        elif isinstance(value, list):
            if value:
                table.add_row(key, ", ".join(map(str, value)))
        else:
            table.add_row(key, _number(value, digits))
    return table
