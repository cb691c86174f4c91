"""Data files that start with a UTF-8 byte-order mark (Windows editors, Excel exports) read as if they had none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lav2.data import load_source
from lav2.errors import Lav2Error
from lav2.recipe import Source

BOM = b"\xef\xbb\xbf"
ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
          {"instruction": "Name a shape.", "output": "A circle."}]


def _write(path: Path, text: str, prefix: bytes = BOM) -> Path:
    path.write_bytes(prefix + text.encode("utf-8"))
    return path


def _turns(records) -> list[tuple[str, str]]:
    return [(turn.user, turn.assistant) for record in records for turn in record.turns]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_file_with_a_bom_reads_like_one_without(tmp_path: Path, suffix: str):
    text = json.dumps(ALPACA) if suffix == ".json" else "".join(json.dumps(r) + "\r\n" for r in ALPACA)
    with_bom, _ = load_source(Source(_write(tmp_path / f"bom{suffix}", text), "alpaca"))
    plain, _ = load_source(Source(_write(tmp_path / f"plain{suffix}", text, b""), "alpaca"))
    assert _turns(with_bom) == _turns(plain) == [("Name a colour.", "Red."), ("Name a shape.", "A circle.")]
    assert [r.index for r in with_bom] == [r.index for r in plain]  # JSONL line numbers are not shifted


def test_caption_llava_and_coco_files_with_a_bom_read(tmp_path: Path):
    (tmp_path / "cat.jpg").write_bytes(b"")  # images are only stat-ed while files are read
    captions = _write(tmp_path / "captions.json", json.dumps([{"image": "cat.jpg", "caption": "A cat."}]))
    llava = _write(tmp_path / "llava.json", json.dumps([{"image": "cat.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}]))
    coco = _write(tmp_path / "coco.json", json.dumps({"images": [{"id": 7, "file_name": "cat.jpg"}],
                                                     "annotations": [{"image_id": 7, "caption": "A cat."}]}))
    for path, fmt in ((captions, "captions"), (llava, "llava"), (coco, "coco")):
        records, _ = load_source(Source(path, fmt))
        assert _turns(records)[-1][1] == "A cat." and records[0].image == tmp_path / "cat.jpg"


def test_utf16_file_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "excel.json"
    path.write_bytes(json.dumps(ALPACA).encode("utf-16"))  # Python writes UTF-16 with its mark, as Excel does
    with pytest.raises(Lav2Error) as info:
        load_source(Source(path, "alpaca"))
    message = str(info.value)
    assert "\n" not in message and "UTF-16" in message and "save it as UTF-8" in message


def test_a_bad_byte_after_the_bom_is_reported_at_its_offset_in_the_file(tmp_path: Path):
    path = tmp_path / "bad.json"
    data = BOM + b'[{"instruction": "x\xff"}]'
    path.write_bytes(data)
    with pytest.raises(Lav2Error) as info:
        load_source(Source(path, "alpaca"))
    offset = data.index(b"\xff")  # from the file's first byte, the mark included
    assert f"not UTF-8 text (invalid start byte at byte {offset})" in str(info.value)
