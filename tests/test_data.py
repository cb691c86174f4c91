"""Data: every format parses, masking supervises exactly the answers, batches are padded right and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lav2.data import (IGNORE_INDEX, Batches, Example, Mixture, SourceDataset, collate, encode_example,
                       encode_prompt, load_image, load_source, order, prepare)
from lav2.errors import Lav2Error
from lav2.prompts import CAPTION_INSTRUCTION, Turn
from lav2.recipe import Source, load_recipe
from conftest import EXAMPLES, ROOT

BAD_DATA = ROOT / "tests" / "bad_inputs" / "data"


def supervised_spans(tokens: list[int], labels: list[int]) -> list[list[int]]:
    """Runs of supervised positions, each ending at its eos."""
    spans, current = [], []
    for token, label in zip(tokens, labels):
        if label != IGNORE_INDEX:
            assert label == token  # labels are not shifted
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    return spans + ([current] if current else [])


def dataset(path: Path, tokenizer, fmt: str, max_seq_len: int = 512, **kw) -> SourceDataset:
    records, _ = load_source(Source(path, fmt, **kw))
    return SourceDataset(records, tokenizer, "alpaca", max_seq_len, path)


def test_alpaca_json_and_jsonl_parse_the_same_records():
    json_records, _ = load_source(Source(EXAMPLES / "alpaca.json", "alpaca"))
    jsonl_records, _ = load_source(Source(EXAMPLES / "alpaca.jsonl", "alpaca"))
    assert [r.turns for r in json_records] == [r.turns for r in jsonl_records]
    assert len(json_records) == 4
    assert json_records[1].turns[0] == Turn("Translate the sentence into French.", "Le chat dort.", "The cat sleeps.")
    assert json_records[2].image == EXAMPLES / "images" / "red_circle.png"


def test_llava_is_multi_turn_without_the_image_marker():
    records, _ = load_source(Source(EXAMPLES / "llava.json", "llava"))
    assert records[0].turns == (Turn("What colour is the shape?", "The shape is blue."),
                                Turn("And what shape is it?", "It is a square."))
    assert records[1].turns[0].user == "Describe the image."
    assert records[0].image == EXAMPLES / "images" / "blue_square.png" and records[2].image is None


def test_coco_gives_one_caption_record_per_annotation_with_its_image():
    data = json.loads((EXAMPLES / "coco_captions.json").read_text())
    records, _ = load_source(Source(EXAMPLES / "coco_captions.json", "coco", image_root=EXAMPLES / "images"))
    assert len(records) == len(data["annotations"]) == 8
    names = {image["id"]: image["file_name"] for image in data["images"]}
    for record, annotation in zip(records, data["annotations"]):
        assert record.image == EXAMPLES / "images" / names[annotation["image_id"]]
        assert record.turns == (Turn(CAPTION_INSTRUCTION, annotation["caption"]),)


def test_plain_captions_parse_from_json_and_jsonl():
    a, _ = load_source(Source(EXAMPLES / "captions.json", "captions"))
    b, _ = load_source(Source(EXAMPLES / "captions.jsonl", "captions"))
    assert [(r.image, r.turns) for r in a] == [(r.image, r.turns) for r in b] and len(a) == 4


@pytest.mark.parametrize("name,fmt", [("alpaca.json", "alpaca"), ("llava.json", "llava"),
                                      ("captions.json", "captions")])
def test_supervised_tokens_decode_to_exactly_the_answers(name, fmt, data_tokenizer):
    data = dataset(EXAMPLES / name, data_tokenizer, fmt)
    for i in range(len(data)):
        example, record = data[i], data.records[i]
        assert example.tokens[0] == data_tokenizer.bos_id and example.labels[0] == IGNORE_INDEX
        spans = supervised_spans(example.tokens, example.labels)
        assert len(spans) == len(record.turns)  # loss on every assistant turn
        for span, turn in zip(spans, record.turns):
            assert span[-1] == data_tokenizer.eos_id
            assert data_tokenizer.decode(span[:-1]).strip() == turn.assistant


def test_the_inference_prompt_is_the_training_prefix(data_tokenizer):
    turns = [Turn("What colour is it?", "Blue."), Turn("And the shape?", "A square.")]
    tokens, labels = encode_example(data_tokenizer, "chat", turns)
    prompt = encode_prompt(data_tokenizer, "chat", [turns[0], Turn("And the shape?")])
    assert tokens[: len(prompt)] == prompt
    assert labels[len(prompt)] != IGNORE_INDEX and labels[len(prompt) - 1] == IGNORE_INDEX


def test_truncation_keeps_max_seq_len_and_drops_records_left_without_answer(data_tokenizer):
    full = dataset(EXAMPLES / "alpaca.json", data_tokenizer, "alpaca")
    prompt_len = min(len(encode_prompt(data_tokenizer, "alpaca", [Turn(r.turns[0].user, None, r.turns[0].input)]))
                     for r in full.records)
    short = dataset(EXAMPLES / "alpaca.json", data_tokenizer, "alpaca", max_seq_len=prompt_len + 1)
    assert short.dropped == len(full) - len(short) >= 1
    for i in range(len(short)):
        example = short[i]
        assert len(example.tokens) == len(example.labels) == prompt_len + 1
        assert any(label != IGNORE_INDEX for label in example.labels)


def test_collate_pads_right_and_masks_rows_without_image(data_tokenizer, preprocess):
    data = dataset(EXAMPLES / "alpaca.json", data_tokenizer, "alpaca")
    examples = [data[i] for i in range(len(data))]
    batch = collate(examples, pad_id=data_tokenizer.pad_id, preprocess=preprocess)
    lengths = [len(e.tokens) for e in examples]
    assert batch.tokens.shape == batch.labels.shape == (4, max(lengths))
    assert batch.tokens.dtype == batch.labels.dtype == torch.long
    for row, n in enumerate(lengths):
        assert (batch.tokens[row, n:] == data_tokenizer.pad_id).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
    assert batch.image_mask.tolist() == [False, False, True, False]
    assert batch.images.shape == (4, 3, 32, 32) and batch.images[0].abs().sum() == 0
    assert batch.images[2].abs().sum() > 0
    text_only = collate([examples[0], examples[1]], data_tokenizer.pad_id, preprocess)
    assert text_only.images is None and not text_only.image_mask.any()


@pytest.mark.parametrize("mode", ["RGB", "P", "RGBA", "L", "CMYK", "LA", "I;16"])
def test_any_image_mode_becomes_three_rgb_channels(tmp_path, mode, preprocess):
    image = Image.new("RGB", (20, 12), (200, 40, 10)).convert(mode)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    assert load_image(path, preprocess).shape == (3, 32, 32)


def test_order_is_a_seeded_permutation_per_epoch():
    assert sorted(order(100, 0, 0)) == list(range(100))
    assert order(100, 0, 0) == order(100, 0, 0)
    assert order(100, 0, 0) != order(100, 0, 1) and order(100, 0, 0) != order(100, 1, 0)


def test_json_and_jsonl_give_identical_batches(data_tokenizer, preprocess):
    def first_batches(name: str) -> list:
        mixture = Mixture([dataset(EXAMPLES / name, data_tokenizer, "alpaca")], [1.0])
        batches = Batches(mixture, 3, seed=7, pad_id=data_tokenizer.pad_id, preprocess=preprocess)
        return [next(batches) for _ in range(5)]

    for a, b in zip(first_batches("alpaca.json"), first_batches("alpaca.jsonl")):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.image_mask, b.image_mask)


def test_batches_resume_exactly_at_a_position(data_tokenizer, preprocess):
    sources = [dataset(EXAMPLES / "alpaca.json", data_tokenizer, "alpaca"),
               dataset(EXAMPLES / "llava.json", data_tokenizer, "llava")]
    mixture = Mixture(sources, [1.0, 2.0])
    straight = Batches(mixture, 3, seed=1, pad_id=0, preprocess=preprocess)
    expected = [next(straight) for _ in range(9)]  # several epochs: the epoch length is 4 + 2 * 3
    resumed = Batches(mixture, 3, seed=1, pad_id=0, preprocess=preprocess, start=4 * 3)
    for want in expected[4:]:
        got = next(resumed)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.labels, want.labels)
    assert resumed.position == straight.position == 27


def test_weights_up_and_down_sample_sources(data_tokenizer):
    sources = [dataset(EXAMPLES / "alpaca.json", data_tokenizer, "alpaca"),
               dataset(EXAMPLES / "captions.json", data_tokenizer, "captions")]
    mixture = Mixture(sources, [2.0, 0.5])
    assert len(mixture) == 8 and mixture.epoch_len == 2 * 4 + 2
    epoch = mixture.epoch_order(seed=0, epoch=3)
    assert sorted(i for i in epoch if i < 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len([i for i in epoch if i >= 4]) == 2 and len(set(i for i in epoch if i >= 4)) == 2


def test_skip_bad_records_counts_and_reports_the_first(tmp_path, data_tokenizer):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n{broken\n'
                    '{"instruction": "d", "output": "e", "image": "nope.png"}\n{"instruction": "f", "output": "g"}\n')
    with pytest.raises(Lav2Error, match="line 2: missing field 'output'"):
        load_source(Source(path, "alpaca"))
    records, report = load_source(Source(path, "alpaca"), skip_bad=True)
    assert [r.index for r in records] == [1, 5]
    assert (report.kept, report.skipped) == (2, 3)
    assert report.summary().startswith("skipped 3 bad records in") and "line 2: missing field" in report.summary()


def test_an_unreadable_image_is_dropped_from_its_batch_when_skipping(data_tokenizer, preprocess):
    good = Example([1, 5, 2], [IGNORE_INDEX, 5, 2], EXAMPLES / "images" / "red_circle.png", "a record 0")
    bad = Example([1, 6, 2], [IGNORE_INDEX, 6, 2], BAD_DATA / "broken.png", "b record 0")
    with pytest.raises(Lav2Error, match="b record 0: image .*broken.png cannot be read"):
        collate([good, bad], 0, preprocess)
    batch = collate([good, bad], 0, preprocess, skip_bad=True)
    assert batch.tokens.shape[0] == 1 and len(batch.skipped) == 1


def test_prepare_builds_both_kinds_from_the_example_recipe(data_tokenizer, preprocess):
    data = prepare(load_recipe(EXAMPLES / "example.yaml"), data_tokenizer, preprocess)
    assert len(data.instruction) == 4 + 3 and data.instruction.epoch_len == 4 + 2 * 3
    assert len(data.caption) == 8 + 4
    assert data.messages() == [] and data.dropped == 0
    batch = next(data.batches("caption", 4, seed=0))
    assert batch.image_mask.all() and batch.images.shape == (4, 3, 32, 32)


def test_prepare_with_skip_bad_records_reports_each_file(data_tokenizer, preprocess):
    recipe = load_recipe(ROOT / "tests" / "bad_inputs" / "empty_output.yaml", ["train.skip_bad_records=true"])
    data = prepare(recipe, data_tokenizer, preprocess)
    assert len(data.instruction) == 1
    assert data.messages() == [f"skipped 1 bad records in {data.reports[0].summary().split(' in ', 1)[1]}"]
    assert "record 1: field 'output' is empty" in data.messages()[0]


def test_52k_alpaca_records_load_and_check(tmp_path, data_tokenizer):
    records = [{"instruction": f"Question number {i}?", "input": "some context" if i % 3 == 0 else "",
                "output": f"Answer number {i}."} for i in range(52_000)]
    path = tmp_path / "alpaca_52k.json"
    path.write_text(json.dumps(records))
    loaded, report = load_source(Source(path, "alpaca"))
    assert report.kept == len(loaded) == 52_000 and report.skipped == 0
    assert loaded[51_998].turns[0] == Turn("Question number 51998?", "Answer number 51998.", "")
    assert loaded[3].turns[0].input == "some context"
    data = SourceDataset(loaded, data_tokenizer, "alpaca", 512, path)
    assert len(data) == 52_000 and data.dropped == 0
    spans = supervised_spans(data[12_345].tokens, data[12_345].labels)
    assert data_tokenizer.decode(spans[0][:-1]).strip() == "Answer number 12345."


def write_image_data(folder: Path) -> Path:
    """A recipe over two files whose records name three good images and, in three records, two bad ones."""
    import yaml
    from conftest import make_image

    folder.mkdir(parents=True, exist_ok=True)
    make_image(folder / "good.png")
    png = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "garbage.png").write_bytes(b"not an image at all")
    captions = [{"image": "good.png", "caption": "A red circle."}, {"image": "truncated.png", "caption": "A circle."},
                {"image": "garbage.png", "caption": "A circle."}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    alpaca = [{"instruction": "What is it?", "output": "A circle.", "image": name}
              for name in ("good.png", "good.png", "garbage.png")]
    (folder / "alpaca.json").write_text(json.dumps(alpaca))
    recipe = {"base": "tiny", "layout": "tiny",
              "data": {"instruction": [{"path": "alpaca.json", "format": "alpaca"}],
                       "caption": [{"path": "captions.jsonl", "format": "captions"}]}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "recipe.yaml"


def test_prepare_reports_every_bad_image_at_once_or_skips_them(tmp_path, data_tokenizer, preprocess):
    recipe = write_image_data(tmp_path)
    with pytest.raises(Lav2Error) as error:
        prepare(load_recipe(recipe), data_tokenizer, preprocess)
    message = str(error.value)
    assert "\n" not in message and message.startswith("3 records have an unreadable image: ")
    assert "alpaca.json record 2: image" in message and "garbage.png (not an image Pillow can read)" in message
    assert "captions.jsonl line 2: image" in message and "truncated.png (corrupt or truncated" in message
    assert "train.skip_bad_records" in message
    data = prepare(load_recipe(recipe, ["train.skip_bad_records=true"]), data_tokenizer, preprocess)
    assert len(data.instruction) == 2 and len(data.caption) == 1
    lines = data.messages()
    assert len(lines) == 2 and lines[0].startswith("skipped 1 bad records in") and "record 2: image" in lines[0]
    assert lines[1].startswith("skipped 2 bad records in") and "line 2: image" in lines[1]


def test_many_images_are_each_checked_once(tmp_path, monkeypatch, data_tokenizer, preprocess):
    from lav2 import data as data_module

    recipe = write_image_data(tmp_path)
    names = [f"img{i}.png" for i in range(data_module.PROGRESS_OVER + 1)]
    for name in names:
        (tmp_path / name).write_bytes((tmp_path / "good.png").read_bytes())
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": "A circle."}) + "\n"
                                                     for n in names * 2))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Hi?", "output": "Hello."}]))
    checked = []
    real = data_module.image_problem
    monkeypatch.setattr(data_module, "image_problem", lambda path: checked.append(path) or real(path))
    data = prepare(load_recipe(recipe), data_tokenizer, preprocess)
    assert len(data.caption) == 2 * len(names) and sorted(checked) == sorted(tmp_path / n for n in names)


def long_tailed_mixture(tokenizer, tmp_path: Path, n: int = 240) -> Mixture:
    """Alpaca records whose answers are mostly short and a few long (lengths drawn log-normal, seeded)."""
    generator = torch.Generator().manual_seed(0)
    words = torch.empty(n).log_normal_(2.5, 0.9, generator=generator).clamp(1, 200).int().tolist()
    records = [{"instruction": f"Describe item {i}.", "output": " ".join(["the red circle"] * w)}
               for i, w in enumerate(words)]
    path = tmp_path / "long_tailed.json"
    path.write_text(json.dumps(records))
    return Mixture([dataset(path, tokenizer, "alpaca")], [1.0])


def epoch_indices(batches: Batches, epoch: int) -> list[int]:
    length = batches.data.epoch_len
    return [batches._index(p) for p in range(epoch * length, (epoch + 1) * length)]


def test_length_grouping_hands_out_every_record_once_per_epoch(data_tokenizer, tmp_path):
    mixture = long_tailed_mixture(data_tokenizer, tmp_path, n=203)  # not a multiple of the batch size
    batches = Batches(mixture, 4, seed=3, pad_id=0, group_by_length=True)
    for epoch in range(3):
        assert sorted(epoch_indices(batches, epoch)) == list(range(203))
    assert epoch_indices(batches, 0) != epoch_indices(batches, 1)
    grouped = Batches(mixture, 4, seed=3, pad_id=0, group_by_length=True)
    assert epoch_indices(grouped, 0) == epoch_indices(batches, 0)  # seeded
    lengths = mixture.lengths()
    firsts = [lengths[i] for i in epoch_indices(batches, 0)[:200:4]]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # the order does not follow length


def test_length_grouped_batches_resume_exactly_at_any_position(data_tokenizer, tmp_path):
    mixture = long_tailed_mixture(data_tokenizer, tmp_path, n=50)
    straight = Batches(mixture, 4, seed=1, pad_id=0, group_by_length=True)
    expected = [next(straight) for _ in range(30)]  # over two epochs: 50 is not a multiple of 4
    for resume_at in (1, 12, 13, 29):
        resumed = Batches(mixture, 4, seed=1, pad_id=0, group_by_length=True, start=4 * resume_at)
        for want in expected[resume_at:]:
            got = next(resumed)
            assert torch.equal(got.tokens, want.tokens) and torch.equal(got.labels, want.labels)


def test_length_grouping_pads_far_less_than_random_order(data_tokenizer, tmp_path):
    mixture = long_tailed_mixture(data_tokenizer, tmp_path)

    def padding(group: bool) -> float:
        batches = Batches(mixture, 4, seed=0, pad_id=0, group_by_length=group)
        tokens = torch.cat([next(batches).tokens.flatten() for _ in range(mixture.epoch_len // 4)])
        return float((tokens == 0).float().mean())

    random_order, grouped = padding(False), padding(True)
    assert random_order > 0.3 and grouped < random_order / 5
