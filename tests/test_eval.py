"""`lav2 eval`: the task readers on small fixtures, resumable predictions, missing images, the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from conftest import make_image
from lav2 import eval as ev
from lav2 import load, metrics
from lav2.cli import main
from lav2.errors import Lav2Error
from lav2.generate import answer
from lav2.prompts import CAPTION_INSTRUCTION
from test_generate import make_lively_folder


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_predictions(out: Path, answers: dict[str, str], items) -> Path:
    """predictions.jsonl as a run killed after answering `answers` (id -> text) would have left it."""
    questions = {item.id: item.question for item in items}
    return write_jsonl(out / ev.PREDICTIONS_FILE, [{"id": k, "question": questions[k], "prediction": v}
                                                   for k, v in answers.items()])


# --- readers -----------------------------------------------------------------------------------------------


def test_read_coco_captions_groups_captions_per_image(tmp_path):
    make_image(tmp_path / "red.png")
    data = write_json(tmp_path / "captions_val2014.json", {
        "images": [{"id": 7, "file_name": "red.png"}, {"id": 8, "file_name": "blue.png"},
                   {"id": 9, "file_name": "x.png"}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "A red ball."},
                        {"image_id": 8, "id": 2, "caption": "Blue."},
                        {"image_id": 7, "id": 3, "caption": "A red circle."}],
    })
    items = ev.read_items("caption", data)
    assert [(i.id, i.image, i.truth) for i in items] == [
        ("7", tmp_path / "red.png", ("A red ball.", "A red circle.")), ("8", tmp_path / "blue.png", ("Blue.",))]
    assert items[0].question == CAPTION_INSTRUCTION  # image 9 has no caption: not part of the evaluation


def test_read_karpathy_split_takes_the_test_images_unless_told(tmp_path):
    data = write_json(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 11, "sentences": [{"raw": "One."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "val", "cocoid": 12, "sentences": [{"raw": "Two."}]},
        {"filepath": "train2014", "filename": "c.jpg", "split": "train", "cocoid": 13, "sentences": [{"raw": "3"}]},
    ]})
    images = tmp_path / "coco"
    [test] = ev.read_items("caption", data, image_root=images)
    assert (test.id, test.image, test.truth) == ("11", images / "val2014" / "a.jpg", ("One.",))
    [val] = ev.read_items("caption", data, image_root=images, split="val")
    assert val.id == "12"
    with pytest.raises(Lav2Error, match=r"no images in split 'restval'; the file has test, train, val"):
        ev.read_items("caption", data, split="restval")


def test_read_plain_caption_list(tmp_path):
    data = write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "captions": ["x", "y"]},
                                                 {"image": "b.png", "caption": "z", "id": "b"}])
    items = ev.read_items("caption", data)
    assert [(i.id, i.truth) for i in items] == [("a.png", ("x", "y")), ("b", ("z",))]
    with pytest.raises(Lav2Error, match="--split picks a part of a Karpathy split JSON"):
        ev.read_items("caption", data, split="test")


def make_mme(root: Path, nested: bool = False) -> Path:
    """MME's two layouts: existence and OCR keep image and txt side by side; artwork has images/ and
    questions_answers_YN/ (as in the release)."""
    base = root / "MME_Benchmark" if nested else root
    for subtask, stem in (("existence", "000000006040"), ("OCR", "0001")):
        make_image((base / subtask).mkdir(parents=True) or base / subtask / f"{stem}.png")
        (base / subtask / f"{stem}.txt").write_text(
            "Is there a ball in this image? Please answer yes or no.\tYes\n"
            "Is there a cat in this image? Please answer yes or no.\tNo\n\n")
    (base / "artwork" / "images").mkdir(parents=True)
    (base / "artwork" / "questions_answers_YN").mkdir()
    make_image(base / "artwork" / "images" / "10002.jpg")
    (base / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork a painting? Please answer yes or no.\tYes \n"
        "Is this artwork glassware? Please answer yes or no.\tno\n")
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_read_mme_both_layouts(tmp_path, nested):
    root = make_mme(tmp_path / "MME_Benchmark_release_version", nested)
    base = root / "MME_Benchmark" if nested else root
    items = ev.read_items("mme", root)
    assert [(i.id, i.truth, i.group) for i in items] == [
        ("OCR/0001/1", "yes", "OCR"), ("OCR/0001/2", "no", "OCR"),
        ("artwork/10002/1", "yes", "artwork"), ("artwork/10002/2", "no", "artwork"),
        ("existence/000000006040/1", "yes", "existence"), ("existence/000000006040/2", "no", "existence")]
    assert items[2].image == base / "artwork" / "images" / "10002.jpg"
    assert items[0].image == base / "OCR" / "0001.png"
    assert items[0].question == "Is there a ball in this image? Please answer yes or no."


def test_read_mme_bad_line_names_file_and_line(tmp_path):
    root = make_mme(tmp_path / "mme")
    (root / "OCR" / "0001.txt").write_text("Is it red?\tYes\nIs it blue? Maybe\n")
    with pytest.raises(Lav2Error, match=r"OCR/0001.txt line 2: expected 'question<TAB>Yes'"):
        ev.read_items("mme", root)
    with pytest.raises(Lav2Error, match="no MME subtask folders"):
        ev.read_items("mme", (tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(Lav2Error, match="--image-root does not apply to --task mme: MME keeps its images"):
        ev.read_items("mme", root, image_root=tmp_path)


def test_read_choice_prompts_with_lettered_options(tmp_path):
    data = write_json(tmp_path / "sqa.json", [
        {"id": "q1", "question": "Which is a metal?", "options": ["wood", "iron"], "answer": "B",
         "image": "a.png", "subject": "physics", "hint": "Metals conduct."},
        {"question": "Pick C.", "choices": ["x", "y", "z"], "answer": 2, "hint": "", "image": None},  # ScienceQA's
    ])
    first, second = ev.read_items("choice", data)
    assert first.question == "Which is a metal?\nA. wood\nB. iron\n" + ev.CHOICE_INSTRUCTION
    assert (first.id, first.truth, first.group, first.context, first.image) == (
        "q1", (1, 2), "physics", "Metals conduct.", tmp_path / "a.png")
    assert (second.id, second.truth, second.image, second.group, second.context) == (
        "record 1", (2, 3), None, None, None)


@pytest.mark.parametrize("record, problem", [
    ({"options": ["a", "b"], "answer": 0}, r"record 0: missing field 'question'"),
    ({"question": "q", "options": ["a"], "answer": 0}, r"record 0: field 'options' needs 2 to 26 options, has 1"),
    ({"question": "q", "options": ["a", "b"], "answer": "C"},
     r"record 0: field 'answer' must be a letter A-B or an index 0-1, not 'C'"),
    ({"question": "q", "options": ["a", ""], "answer": 0}, r"record 0: options\[1\] must be a non-empty string"),
])
def test_read_choice_bad_records_name_record_and_field(tmp_path, record, problem):
    data = write_json(tmp_path / "bad.json", [record])
    with pytest.raises(Lav2Error, match=problem):
        ev.read_items("choice", data)


def test_read_vqa_plain_list(tmp_path):
    data = write_jsonl(tmp_path / "vqa.jsonl", [
        {"question_id": 5, "image": "a.png", "question": "What colour?", "answers": ["red", "Red"],
         "answer_type": "other"},
        {}, {"image": "b.png", "question": "How many?", "answers": [{"answer": "2"}]}])
    with pytest.raises(Lav2Error, match=r"vqa.jsonl line 2: missing field 'question'"):
        ev.read_items("vqa", data)
    data.write_text(data.read_text().replace("{}\n", "\n"))  # a blank line: skipped, later lines keep their numbers
    first, second = ev.read_items("vqa", data)
    assert (first.id, first.truth, first.group) == ("5", ("red", "Red"), "other")
    assert first.question == "What colour?\n" + ev.VQA_INSTRUCTION
    assert (second.id, second.truth) == ("line 3", ("2",))


def test_read_vqav2_pair_finds_annotations_beside(tmp_path):
    questions = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014", "questions": [{"image_id": 42, "question": "Is it red?", "question_id": 420}]})
    with pytest.raises(Lav2Error, match=r"\(looked for v2_mscoco_val2014_annotations.json\); pass --annotations FILE"):
        ev.read_items("vqa", questions)
    write_json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answer_type": "yes/no",
         "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)]}]})
    [item] = ev.read_items("vqa", questions, image_root=tmp_path / "val2014")
    assert (item.id, item.image, item.truth, item.group) == (
        "420", tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", ("yes",) * 10, "yes/no")
    other = shutil.copy(tmp_path / "v2_mscoco_val2014_annotations.json", tmp_path / "mine.json")
    [same] = ev.read_items("vqa", questions, annotations=Path(other), image_root=tmp_path / "val2014")
    assert same == item


def test_read_items_one_line_errors(tmp_path):
    with pytest.raises(Lav2Error, match="unknown task 'captions'; choose one of caption, mme, choice, vqa"):
        ev.read_items("captions", tmp_path / "x.json")
    with pytest.raises(Lav2Error, match="nope.json: no such data file"):
        ev.read_items("choice", tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('[{"question": "q",\n "options": [}]')
    with pytest.raises(Lav2Error, match="broken.json line 2 column 14: broken JSON"):
        ev.read_items("choice", tmp_path / "broken.json")
    write_json(tmp_path / "dup.json", [{"image": "a.png", "caption": "x"}, {"image": "a.png", "caption": "y"}])
    with pytest.raises(Lav2Error, match="two records have the id 'a.png'"):
        ev.read_items("caption", tmp_path / "dup.json")
    with pytest.raises(Lav2Error, match="--annotations does not apply to --task caption"):
        ev.read_items("caption", tmp_path / "dup.json", annotations=tmp_path / "a.json")


# --- predictions, resume, missing images (no model needed when every readable item is answered) -----------


def test_read_predictions_drops_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / ev.PREDICTIONS_FILE
    path.write_text('{"id": "a", "question": "q", "prediction": "yes"}\n{"id": "b", "question": "q", "predi')
    assert ev.read_predictions(path) == {"a": {"question": "q", "prediction": "yes"}}
    assert path.read_text() == '{"id": "a", "question": "q", "prediction": "yes"}\n'
    path.write_text('{"id": "a"}\n')
    with pytest.raises(Lav2Error, match=r"predictions.jsonl line 1: not a prediction line"):
        ev.read_predictions(path)


def choice_data(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        make_image(tmp_path / name)
    return write_json(tmp_path / "sqa.json", [
        {"id": "1", "question": "Q1", "options": ["x", "y"], "answer": "A", "image": "a.png", "category": "c1"},
        {"id": "2", "question": "Q2", "options": ["x", "y"], "answer": "B", "image": "b.png", "category": "c1"},
        {"id": "3", "question": "Q3", "options": ["x", "y", "z"], "answer": 2, "image": "c.png", "category": "c2"},
        {"id": "4", "question": "Q4", "options": ["x", "y"], "answer": 0, "image": "gone.png"},
        {"id": "5", "question": "Q5", "options": ["x", "y"], "answer": 0, "image": "gone_too.png"},
    ])


def test_a_finished_run_is_scored_from_its_predictions_without_the_model(tmp_path):
    data = choice_data(tmp_path)
    items = ev.read_items("choice", data)
    out = tmp_path / "out"
    write_predictions(out, {"1": "A", "2": "The answer is A.", "3": "C. z"}, items)
    console = quiet()
    # the model folder does not exist: it is never loaded, since every item with an image is answered
    result = ev.evaluate(tmp_path / "no-model", task="choice", data=data, out=out, console=console)
    # right: 1 (A) and 3 (C); 2 answered A for B -> 2/3; c1 1 of 2, c2 1 of 1
    assert result["metrics"] == {"accuracy": pytest.approx(200 / 3), "correct": 2, "count": 3, "unparsed": 0,
                                 "categories": {"c1": {"accuracy": 50.0, "count": 2},
                                                "c2": {"accuracy": 100.0, "count": 1}}}
    assert (result["items"], result["scored"]) == (5, 3)
    assert result["skipped"] == {"count": 2, "reasons": {"image missing or unreadable": 2},
                                 "first": [str(tmp_path / "gone.png"), str(tmp_path / "gone_too.png")]}
    assert json.loads((out / ev.METRICS_FILE).read_text()) == result
    printed = console.file.getvalue()
    assert "2 of 5 items skipped (2 image missing or unreadable; first: " in printed and "gone.png" in printed
    assert "66.67" in printed  # the table


def test_limit_takes_the_first_items_and_lines_of_other_items_are_not_scored(tmp_path):
    data = choice_data(tmp_path)
    items = ev.read_items("choice", data)
    out = tmp_path / "out"
    write_predictions(out, {"1": "A", "2": "B", "3": "A"}, items)
    result = ev.evaluate("no-model", task="choice", data=data, out=out, limit=2, console=quiet())
    assert (result["items"], result["scored"], result["metrics"]["accuracy"]) == (2, 2, 100.0)


def test_predictions_of_another_eval_are_refused(tmp_path):
    data = choice_data(tmp_path)
    write_jsonl(tmp_path / "out" / ev.PREDICTIONS_FILE, [{"id": "1", "question": "another", "prediction": "A"}])
    with pytest.raises(Lav2Error, match="item '1' was asked another question there; .* use another --out"):
        ev.evaluate("no-model", task="choice", data=data, out=tmp_path / "out", console=quiet())


def test_mme_scored_from_predictions(tmp_path):
    root = make_mme(tmp_path / "mme")
    items = ev.read_items("mme", root)
    out = tmp_path / "out"
    write_predictions(out, {"OCR/0001/1": "Yes", "OCR/0001/2": "No", "artwork/10002/1": "Yes",
                            "artwork/10002/2": "Yes", "existence/000000006040/1": "no",
                            "existence/000000006040/2": "Not at all"}, items)
    result = ev.evaluate("no-model", task="mme", data=root, out=out, console=quiet())
    subtasks = result["metrics"]["subtasks"]
    # OCR both right: 200; artwork one of two: 50 + 0; existence one of two ("Not" reads as no): 50 + 0
    assert {k: v["score"] for k, v in subtasks.items()} == {"OCR": 200.0, "artwork": 50.0, "existence": 50.0}
    assert result["metrics"]["perception"] == 300.0 and result["metrics"]["cognition"] == 0


def test_caption_scored_from_predictions_without_java(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    for name in ("a.png", "b.png"):
        make_image(tmp_path / name)
    data = write_json(tmp_path / "caps.json", [{"image": "a.png", "captions": ["a red circle on a grey ground"]},
                                               {"image": "b.png", "captions": ["one blue square in white light"]}])
    items = ev.read_items("caption", data)
    write_predictions(tmp_path / "out", {"a.png": "A red circle on a grey ground.", "b.png": "seven green dogs"}, items)
    console = quiet()
    result = ev.evaluate("no-model", task="caption", data=data, out=tmp_path / "out", console=console)
    # one perfect caption (CIDEr 10) and one with no word in common (0), as in test_metrics
    assert result["metrics"]["CIDEr"] == pytest.approx(5.0)
    assert result["metrics"]["comparable"] is False
    assert "note: no Java runtime" in console.file.getvalue()


def test_vqa_scored_from_predictions(tmp_path):
    make_image(tmp_path / "a.png")
    data = write_json(tmp_path / "vqa.json", [
        {"question_id": 1, "image": "a.png", "question": "How many?", "answers": ["2"] * 3 + ["3"] * 7}])
    write_predictions(tmp_path / "out", {"1": "Two."}, ev.read_items("vqa", data))
    result = ev.evaluate("no-model", task="vqa", data=data, out=tmp_path / "out", console=quiet())
    assert result["metrics"]["accuracy"] == pytest.approx(90.0)  # worked in test_metrics


def test_all_images_missing_is_one_line(tmp_path):
    data = write_json(tmp_path / "caps.json", [{"image": "gone.png", "caption": "x"}])
    with pytest.raises(Lav2Error, match=r"no item could be scored: all 1 were skipped \(1 image missing or unr"):
        ev.evaluate("no-model", task="caption", data=data, out=tmp_path / "out", console=quiet())


# --- the CLI -----------------------------------------------------------------------------------------------


def run_cli(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def test_cli_scores_and_writes_metrics(tmp_path):
    data = choice_data(tmp_path)
    write_predictions(tmp_path / "out", {"1": "A", "2": "B", "3": "C"}, ev.read_items("choice", data))
    result = run_cli("--model", tmp_path / "m", "--task", "choice", "--data", data, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "100.00" in result.output
    assert json.loads((tmp_path / "out" / ev.METRICS_FILE).read_text())["metrics"]["accuracy"] == 100.0


@pytest.mark.parametrize("args, message", [
    (["--task", "bleu"], "error: unknown task 'bleu'; choose one of caption, mme, choice, vqa"),
    (["--task", "vqa", "--data", "missing.json"], "error: missing.json: no such data file"),
    (["--task", "choice", "--limit", "0"], "error: --limit must be at least 1, not 0"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "d.json", [])
    base = {"--model": "m", "--data": "d.json", "--task": "choice"}
    base.update(dict(zip(args[::2], args[1::2])))
    result = run_cli(*[x for kv in base.items() for x in kv])
    assert result.exit_code == 1
    assert result.output.strip() == message


# --- end to end on a tiny model ----------------------------------------------------------------------------

CHOICE_TOKENS = ev.TASKS["choice"].max_new_tokens


@pytest.fixture(scope="module")
def model_folder(tiny_official, tmp_path_factory) -> Path:
    return make_lively_folder(tiny_official[1], tmp_path_factory.mktemp("eval") / "official")


@pytest.fixture(scope="module")
def loaded(model_folder):
    return load(model_folder, device="cpu", dtype=torch.float32)


def e2e_choice(tmp_path: Path) -> Path:
    """Six questions on images of three colours, one image missing and one corrupt: 4 answered, 2 skipped."""
    for name, colour in (("red.png", (200, 30, 30)), ("blue.png", (30, 30, 200)), ("green.png", (30, 200, 30))):
        make_image(tmp_path / name, colour)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    records = [{"id": f"q{i}", "question": f"What colour is shape {i}?", "options": ["red", "blue", "green"],
                "answer": i % 3, "image": image, "category": "colour" if i % 2 else "shape"}
               for i, image in enumerate(["red.png", "blue.png", "gone.png", "green.png", "corrupt.png", "red.png"])]
    return write_json(tmp_path / "colours.json", records)


def test_eval_answers_as_one_by_one_greedy_decoding_and_skips_bad_images(loaded, tmp_path):
    data = e2e_choice(tmp_path)
    console = quiet()
    result = ev.evaluate(loaded, task="choice", data=data, out=tmp_path / "out", batch_size=3, console=console)
    lines = [json.loads(line) for line in (tmp_path / "out" / ev.PREDICTIONS_FILE).read_text().splitlines()]
    assert [line["id"] for line in lines] == ["q0", "q1", "q3", "q5"]
    items = {item.id: item for item in ev.read_items("choice", data)}
    for line in lines:  # the batched answers are those of the chat's one-conversation path, greedy
        item = items[line["id"]]
        assert line["prediction"] == answer(loaded, item.question, item.image, temperature=0,
                                            max_new_tokens=CHOICE_TOKENS)
    assert result["skipped"] == {"count": 2, "reasons": {"image missing or unreadable": 2},
                                 "first": [str(tmp_path / "gone.png"), str(tmp_path / "corrupt.png")]}
    expected = metrics.choice_scores((items[l["id"]].truth[0], l["prediction"], 3, items[l["id"]].group) for l in lines)
    assert result["metrics"] == expected and result["scored"] == 4
    assert "2 of 6 items skipped (2 image missing or unreadable; first: " in console.file.getvalue()


def test_a_prompt_longer_than_the_context_is_skipped_and_named(loaded, tmp_path):
    make_image(tmp_path / "red.png")
    data = write_json(tmp_path / "long.json", [
        {"id": "short", "question": "Which?", "options": ["red", "blue"], "answer": 0, "image": "red.png"},
        {"id": "long", "question": "Which? " * loaded.config.max_seq_len, "options": ["red", "blue"], "answer": 0}])
    result = ev.evaluate(loaded, task="choice", data=data, out=tmp_path / "out", console=quiet())
    assert result["skipped"] == {"count": 1, "reasons": {"too long for the model's context": 1}, "first": ["long"]}
    assert result["scored"] == 1


def test_resume_after_a_kill_answers_only_what_is_left(loaded, tmp_path):
    data = e2e_choice(tmp_path)
    items = ev.read_items("choice", data)
    out = tmp_path / "out"
    # a run killed while writing its third line: two complete lines (answers the model would not give) and half
    write_predictions(out, {"q0": "A", "q1": "C"}, items)
    with (out / ev.PREDICTIONS_FILE).open("a") as f:
        f.write('{"id": "q3", "question": "What col')
    result = ev.evaluate(loaded, task="choice", data=data, out=out, batch_size=2, console=quiet())
    lines = [json.loads(line) for line in (out / ev.PREDICTIONS_FILE).read_text().splitlines()]
    assert [line["id"] for line in lines] == ["q0", "q1", "q3", "q5"]  # each once; q0, q1 not answered again
    assert [line["prediction"] for line in lines[:2]] == ["A", "C"]
    answers = {line["id"]: line["prediction"] for line in lines}
    # q0 "A" is right (red), q1 "C" is wrong (blue is B); q3 and q5 as the model answered them
    expected = metrics.choice_scores((item.truth[0], answers[item.id], 3, item.group) for item in items
                                     if item.id in answers)
    assert result["metrics"] == expected and result["scored"] == 4
    again = ev.evaluate(loaded, task="choice", data=data, out=out, console=quiet())  # nothing left: no decoding
    assert again["metrics"] == expected
    assert len((out / ev.PREDICTIONS_FILE).read_text().splitlines()) == 4


def test_text_only_model_refuses_image_items(tiny_base, tmp_path):
    data = e2e_choice(tmp_path)
    with pytest.raises(Lav2Error, match="is a text-only model .* evaluate a multimodal model folder"):
        ev.evaluate(tiny_base[1], task="choice", data=data, out=tmp_path / "out", dtype="float32", console=quiet())


def test_cli_end_to_end_with_progress_and_table(model_folder, tmp_path):
    data = e2e_choice(tmp_path)
    out = tmp_path / "out"
    result = run_cli("--model", model_folder, "--task", "choice", "--data", data, "--out", out, "--limit", "2",
                     "--batch-size", "2", "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "choice: 2 of 2 items scored" in result.output and "eval choice" in result.output  # table, bar
    assert json.loads((out / ev.METRICS_FILE).read_text())["scored"] == 2


def test_the_instruction_after_a_question_can_be_changed_or_dropped(tmp_path):
    from lav2 import eval as ev

    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"image": "a.png", "question": "What colour is it?", "answers": ["red"]}) + "\n")
    default = ev.read_items("vqa", data)[0]
    assert default.question == f"What colour is it?\n{ev.VQA_INSTRUCTION}"
    assert ev.read_items("vqa", data, instruction="")[0].question == "What colour is it?"
    assert ev.read_items("vqa", data, instruction="One word.")[0].question == "What colour is it?\nOne word."
    with pytest.raises(Lav2Error, match="--instruction does not apply to --task caption"):
        ev.read_items("caption", data, instruction="")
