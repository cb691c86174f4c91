"""Recipe data to batches: the four file formats, label masking, images, a seeded resumable order, collation.

Every format becomes `Record`s: a conversation (`list[Turn]`) and an optional image path. Caption records are
one-turn conversations whose instruction is `prompts.CAPTION_INSTRUCTION`, so captions and instructions share
one tokenization path. Files are parsed and checked up front (fast: no tokenizing, images only stat-ed);
tokens are made when an example is read, images decoded when a batch is collated.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image, UnidentifiedImageError

from lav2.errors import Lav2Error
from lav2.images import Preprocess, load_image
from lav2.prompts import CAPTION_INSTRUCTION, Turn, training_segments
from lav2.recipe import Recipe, Source, check_data_files, short_path

IGNORE_INDEX = -100  # label of positions that carry no loss (prompts, padding); torch's cross_entropy default


@dataclass(frozen=True, slots=True)
class Record:
    turns: tuple[Turn, ...]
    image: Path | None
    index: int  # position in its file (0-based record, or JSONL line number), for messages


@dataclass
class Example:
    tokens: list[int]
    labels: list[int]  # not shifted: labels[t] is the target at position t where supervised, else IGNORE_INDEX
    image: Path | None
    origin: str  # "FILE record N", for messages about its image


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) long, right-padded with pad_id
    labels: torch.Tensor  # (B, T) long, padded with IGNORE_INDEX
    images: torch.Tensor | None  # (B, 3, H, W) float, zeros in text-only rows; None when no row has an image
    image_mask: torch.Tensor  # (B,) bool, True where the row has an image
    skipped: list[str] = field(default_factory=list)  # unreadable images dropped under skip_bad_records

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.labels.to(device),
                     None if self.images is None else self.images.to(device), self.image_mask.to(device),
                     self.skipped)


@dataclass
class LoadReport:
    """What loading one file kept and skipped, so the caller can print one line per file."""

    path: Path
    kept: int = 0
    skipped: int = 0
    first_problem: str = ""

    def summary(self) -> str:
        return f"skipped {self.skipped} bad records in {short_path(self.path)} (first: {self.first_problem})"


class _Bad(Exception):
    """A bad record; turned into a Lav2Error or a skip by `load_source`."""


# ---------------------------------------------------------------------------------------------- reading files


def _read_text(path: Path) -> str:
    """A data file's text. A UTF-8 byte-order mark, as Windows editors and Excel exports write, is dropped."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise Lav2Error(f"{short_path(path)}: UTF-16 text (as Excel's 'Unicode Text' and Notepad's 'Unicode' "
                        f"save it); save it as UTF-8")
    text = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + len(data) - len(text)  # counted from the file's first byte, the mark included
        raise Lav2Error(f"{short_path(path)}: not UTF-8 text ({e.reason} at byte {at}); save it as UTF-8") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise Lav2Error(f"{short_path(path)} line {e.lineno} column {e.colno}: broken JSON ({e.msg}); "
                        f"fix the file or download it again") from None


def _read_records(path: Path) -> list[tuple[int, object]]:
    """(index, raw record) pairs: a JSON file's top-level list, or one JSONL line each (index = line number)."""
    if path.suffix == ".jsonl":
        items: list[tuple[int, object]] = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    items.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    # A bad record like any other: fatal, or skipped and counted under skip_bad_records.
                    items.append((number, _Bad(f"broken JSONL line ({e.msg} at column {e.colno}); "
                                               f"each line must be one complete JSON object")))
        return items
    data = _read_json(path)
    if not isinstance(data, list):
        raise Lav2Error(f"{short_path(path)}: expected a JSON list of records, found a {type(data).__name__}; "
                        f"use a .jsonl file for one record per line")
    return list(enumerate(data))


def _text(record: dict, key: str, *, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise _Bad(f"missing field {key!r}")
    if not isinstance(value, str):
        raise _Bad(f"field {key!r} must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise _Bad(f"field {key!r} is empty")
    return value


def _image(record: dict, key: str, root: Path) -> Path | None:
    """The record's image path (existence is checked by load_source, once per distinct image)."""
    name = _text(record, key, required=False)
    return None if name is None else root / name


# ---------------------------------------------------------------------------------------------- the formats

_IMAGE_MARKER = re.compile(r"\s*<image>\s*")


def _alpaca(record: dict, root: Path) -> Record:
    turn = Turn(user=_text(record, "instruction"), assistant=_text(record, "output"),
                input=_text(record, "input", required=False))
    return Record((turn,), _image(record, "image", root), 0)


def _llava(record: dict, root: Path) -> Record:
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _Bad("missing or empty 'conversations' list")
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise _Bad(f"conversations[{i}] must be an object with 'from' and 'value'")
        expected = "human" if i % 2 == 0 else "gpt"
        if message.get("from") != expected:
            raise _Bad(f"conversations[{i}] is from {message.get('from')!r}, expected {expected!r} "
                       f"(turns alternate human, gpt)")
        value = _IMAGE_MARKER.sub(" ", _text(message, "value")).strip()
        if not value:
            raise _Bad(f"conversations[{i}] has no text besides the <image> marker")
        if expected == "human":
            turns.append(Turn(user=value))
        else:
            turns[-1].assistant = value
    if turns[-1].assistant is None:
        raise _Bad("the conversation ends with a human turn that has no gpt answer")
    return Record(tuple(turns), _image(record, "image", root), 0)


def _caption(record: dict, root: Path) -> Record:
    image = _image(record, "image", root)
    if image is None:
        raise _Bad("missing field 'image'")
    return Record((Turn(user=CAPTION_INSTRUCTION, assistant=_text(record, "caption")),), image, 0)


def _coco_records(path: Path) -> list[tuple[int, object]]:
    """COCO captions as published: one caption record per annotation, its image found through `images`."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise Lav2Error(f"{short_path(path)}: not a COCO captions file (needs top-level 'images' and "
                        f"'annotations' lists); use format 'captions' for a plain list of {{image, caption}}")
    files = {image.get("id"): image.get("file_name") for image in data["images"] if isinstance(image, dict)}
    items = []
    for i, annotation in enumerate(data["annotations"]):
        if isinstance(annotation, dict) and "image_id" in annotation:
            name = files.get(annotation["image_id"])
            image = {"image": name} if name is not None else {"image_id": annotation["image_id"]}
            items.append((i, {**image, "caption": annotation.get("caption")}))
        else:
            items.append((i, annotation))
    return items


def _coco(record: dict, root: Path) -> Record:
    if "image" not in record:
        raise _Bad(f"image_id {record.get('image_id')!r} is not in the file's 'images' list"
                   if "image_id" in record else "missing field 'image_id'")
    return _caption(record, root)


_PARSERS = {"alpaca": _alpaca, "llava": _llava, "captions": _caption, "coco": _coco}


def _where(source: Source) -> str:
    """What messages call one item of the file: a COCO annotation, a JSONL line, a JSON record."""
    return {"coco": "annotation"}.get(source.format, "line" if source.path.suffix == ".jsonl" else "record")


def load_source(source: Source, *, skip_bad: bool = False) -> tuple[list[Record], LoadReport]:
    """Parse and check every record of one data file; bad ones raise, or are counted and skipped."""
    if not source.path.is_file():
        raise Lav2Error(f"data file not found: {short_path(source.path)}; see recipes/README.md for where to get it")
    root = source.image_root or source.path.parent
    if source.format == "coco":
        items = _coco_records(source.path)
    else:
        items = _read_records(source.path)
    parse = _PARSERS[source.format]
    where = _where(source)
    exists: dict[Path, bool] = {}  # COCO names each image five times: stat it once
    records, report = [], LoadReport(source.path)
    for index, item in items:
        try:
            if isinstance(item, _Bad):
                raise item
            if not isinstance(item, dict):
                raise _Bad(f"expected a JSON object, found {type(item).__name__}")
            record = parse(item, root)
            if record.image is not None:
                if record.image not in exists:
                    exists[record.image] = record.image.is_file()
                if not exists[record.image]:
                    raise _Bad(f"image {short_path(record.image)!r} not found")
        except _Bad as e:
            problem = f"{where} {index}: {e}"
            if not skip_bad:
                raise Lav2Error(f"{short_path(source.path)} {problem}; fix or remove the record, or set "
                                f"train.skip_bad_records: true to skip bad records") from None
            report.skipped += 1
            report.first_problem = report.first_problem or problem
            continue
        records.append(Record(record.turns, record.image, index))
    report.kept = len(records)
    return records, report


# ---------------------------------------------------------------------------------------------- tokens


def encode_example(tokenizer, style: str, turns: list[Turn] | tuple[Turn, ...]) -> tuple[list[int], list[int]]:
    """Tokens and labels of a conversation: bos, then each segment encoded alone, eos after every answer.

    Encoding segments separately keeps the prompt/answer boundary exact (the official code instead encodes
    prompt + answer jointly and masks len(encode(prompt)) tokens, which can shift by a token at the seam).
    A last turn with assistant=None yields an inference prompt (no eos, no labels).
    """
    tokens, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for text, supervised in training_segments(style, list(turns)):
        ids = tokenizer.encode(text, bos=False, eos=supervised)
        tokens += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return tokens, labels


def encode_prompt(tokenizer, style: str, turns: list[Turn]) -> list[int]:
    """The tokens chat feeds the model: the same segments as training, ending before the last answer."""
    return encode_example(tokenizer, style, turns)[0]


class SourceDataset:
    """The records of one data file, tokenized on access and truncated to max_seq_len."""

    def __init__(self, records: list[Record], tokenizer, style: str, max_seq_len: int, path: Path):
        self.tokenizer, self.style, self.max_seq_len, self.path = tokenizer, style, max_seq_len, path
        self._lengths: list[int] | None = None
        # A record is dropped only if its first prompt fills max_seq_len (nothing supervised would remain);
        # checking that prompt alone is much cheaper than tokenizing everything.
        prompt_lengths: dict[str, int] = {}
        self.records, self.dropped = [], 0
        for record in records:
            first = training_segments(style, [Turn(record.turns[0].user, None, record.turns[0].input)])[0][0]
            if first not in prompt_lengths:
                prompt_lengths[first] = 1 + len(tokenizer.encode(first, bos=False))
            if prompt_lengths[first] < max_seq_len:
                self.records.append(record)
            else:
                self.dropped += 1

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        record = self.records[i]
        tokens, labels = encode_example(self.tokenizer, self.style, record.turns)
        where = "line" if self.path.suffix == ".jsonl" else "record"
        return Example(tokens[: self.max_seq_len], labels[: self.max_seq_len], record.image,
                       f"{short_path(self.path)} {where} {record.index}")

    def lengths(self) -> list[int]:
        """Each record's token count after truncation, tokenized once on first use (for length grouping)."""
        if self._lengths is None:
            self._lengths = [min(len(encode_example(self.tokenizer, self.style, r.turns)[0]), self.max_seq_len)
                             for r in self.records]
        return self._lengths


class Mixture:
    """Several sources of one kind (instruction or caption) with sampling weights, as one indexable set.

    A source of weight w contributes floor(w) copies of all its records to each epoch plus a seeded random
    (w - floor(w)) share of them, so epochs have a fixed length and weights 2 / 0.5 up- / down-sample.
    """

    def __init__(self, sources: list[SourceDataset], weights: list[float]):
        self.sources, self.weights = sources, weights
        self.offsets = [sum(len(s) for s in sources[:i]) for i in range(len(sources))]
        self.epoch_len = sum(int(w) * len(s) + round((w - int(w)) * len(s)) for s, w in zip(sources, weights))

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, i: int) -> Example:
        for source, offset in zip(reversed(self.sources), reversed(self.offsets)):
            if i >= offset:
                return source[i - offset]
        raise IndexError(i)

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        indices: list[int] = []
        for k, (source, offset, w) in enumerate(zip(self.sources, self.offsets, self.weights)):
            indices += list(range(offset, offset + len(source))) * int(w)
            extra = round((w - int(w)) * len(source))
            if extra:
                part = order(len(source), seed * 1000 + k, epoch)[:extra]
                indices += [offset + j for j in part]
        return [indices[j] for j in order(len(indices), seed, epoch)]

    def lengths(self) -> list[int]:
        """Token count of every index (see SourceDataset.lengths)."""
        return [n for source in self.sources for n in source.lengths()]


def order(n: int, seed: int | str, epoch: int) -> list[int]:
    """The permutation of range(n) for one epoch; the same (seed, epoch) always gives the same order."""
    generator = torch.Generator().manual_seed(random.Random(f"{seed}/{epoch}").getrandbits(63))
    return torch.randperm(n, generator=generator).tolist()


MEGA_BATCH = 50  # micro-batches sorted together: similar lengths, while the order still varies within an epoch


def group_by_length(indices: list[int], lengths: list[int], batch_size: int, *, seed: int, epoch: int,
                    head: int = 0) -> list[int]:
    """The epoch order `indices` rearranged so that each micro-batch holds records of similar length (less
    padding): cut into mega-batches of MEGA_BATCH micro-batches, each sorted by length and cut into micro-batches,
    which are then shuffled (seeded), so that the order does not follow length. The first `head` indices
    complete the micro-batch that straddles the previous epoch and stay first; a last partial one stays last."""
    rest, mega = indices[head:], MEGA_BATCH * batch_size
    groups = []
    for start in range(0, len(rest), mega):
        chunk = sorted(rest[start:start + mega], key=lambda i: lengths[i])
        groups += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    tail = [groups.pop()] if groups and len(groups[-1]) < batch_size else []
    shuffled = [groups[j] for j in order(len(groups), f"{seed}/length", epoch)] + tail
    return indices[:head] + [i for group in shuffled for i in group]


# ---------------------------------------------------------------------------------------------- batches


def collate(examples: list[Example], pad_id: int, preprocess: Preprocess | None = None,
            max_len: int | None = None, *, skip_bad: bool = False) -> Batch:
    """Right-pad tokens with pad_id and labels with IGNORE_INDEX; stack images, zeros where a row has none.

    An image that fails to decode raises a Lav2Error, or with skip_bad drops its row (listed in Batch.skipped).
    """
    images: list[torch.Tensor | None] = []
    kept, skipped = [], []
    for example in examples:
        if example.image is None:
            images.append(None)
            kept.append(example)
            continue
        if preprocess is None:
            raise ValueError("collate: an example has an image but no preprocess transform was given")
        try:
            images.append(load_image(example.image, preprocess))
            kept.append(example)
        except Lav2Error as e:
            problem = f"{example.origin}: image {short_path(example.image)} cannot be read ({e})"
            if not skip_bad:
                raise Lav2Error(f"{problem}; replace the image or set train.skip_bad_records: true") from None
            skipped.append(problem)
    if not kept:
        raise Lav2Error(f"every image of a batch was unreadable, first: {skipped[0]}; check the image files")
    length = max(len(e.tokens) for e in kept)
    length = min(length, max_len) if max_len else length
    tokens = torch.full((len(kept), length), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(kept):
        n = min(len(example.tokens), length)
        tokens[row, :n] = torch.tensor(example.tokens[:n])
        labels[row, :n] = torch.tensor(example.labels[:n])
    mask = torch.tensor([image is not None for image in images], dtype=torch.bool)
    stacked = None
    if mask.any():
        shape = next(image for image in images if image is not None).shape
        stacked = torch.stack([image if image is not None else torch.zeros(shape) for image in images])
    return Batch(tokens, labels, stacked, mask, skipped)


class Batches:
    """Endless micro-batches of a Mixture in a seeded per-epoch order, startable at any example position.

    `position` counts examples handed out; a run resumed with `start=position` continues with exactly the
    batches the interrupted run would have produced, without reading anything twice. group_by_length: each
    epoch's order rearranged into micro-batches of similar length (see group_by_length).
    """

    def __init__(self, data: Mixture, batch_size: int, *, seed: int, pad_id: int,
                 preprocess: Preprocess | None = None, start: int = 0, skip_bad: bool = False,
                 group_by_length: bool = False):
        if data.epoch_len == 0:
            raise Lav2Error("no training records are left after loading; check the data files and max_seq_len")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.pad_id, self.preprocess, self.skip_bad = pad_id, preprocess, skip_bad
        self.position, self.group_by_length = start, group_by_length
        self._epoch, self._order = -1, []

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.data.epoch_len)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.data.epoch_order(self.seed, epoch)
            if self.group_by_length:
                head = -epoch * self.data.epoch_len % self.batch_size  # micro-batches start at multiples of it
                self._order = group_by_length(self._order, self.data.lengths(), self.batch_size, seed=self.seed,
                                              epoch=epoch, head=head)
        return self._order[offset]

    @property
    def epoch(self) -> float:
        return self.position / self.data.epoch_len

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        indices = [self._index(p) for p in range(self.position, self.position + self.batch_size)]
        self.position += self.batch_size
        return collate([self.data[i] for i in indices], self.pad_id, self.preprocess, skip_bad=self.skip_bad)


# ---------------------------------------------------------------------------------------------- a recipe's data


@dataclass
class PreparedData:
    """What finetune needs: one Mixture per kind (None when the recipe has none of that kind) and the counts."""

    instruction: Mixture | None
    caption: Mixture | None
    reports: list[LoadReport]
    dropped: int  # records whose prompt alone filled max_seq_len
    pad_id: int
    preprocess: Preprocess | None
    skip_bad: bool

    def batches(self, kind: str, batch_size: int, *, seed: int, start: int = 0,
                group_by_length: bool = False) -> Batches:
        data = self.instruction if kind == "instruction" else self.caption
        if data is None:
            raise ValueError(f"the recipe has no {kind} data")
        return Batches(data, batch_size, seed=seed, pad_id=self.pad_id, preprocess=self.preprocess,
                       start=start, skip_bad=self.skip_bad, group_by_length=group_by_length)

    def messages(self) -> list[str]:
        """One line per file with skipped records, and one for dropped over-long records."""
        lines = [r.summary() for r in self.reports if r.skipped]
        if self.dropped:
            lines.append(f"dropped {self.dropped} records whose prompt alone fills train.max_seq_len")
        return lines


PROGRESS_OVER = 1000  # images: more than this many get a progress bar while they are checked
SHOWN_PROBLEMS = 3  # bad records named in the one-line error; the rest are counted


def image_problem(path: Path) -> str | None:
    """Why `path` is not a readable image, or None: it opens and Pillow's verify() passes over its structure
    (cheap: no pixels decoded). collate still decodes each image, since files can change during a run."""
    try:
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Image.DecompressionBombError:
        return "too large to decode safely"
    except Exception as e:  # verify() raises OSError, SyntaxError, struct.error ... on a damaged file
        return f"corrupt or truncated: {str(e).strip() or type(e).__name__}"
    return None


def check_images(images: list[Path]) -> dict[Path, str]:
    """The problem of each unreadable image among `images`, with a transient progress bar on stderr for many."""
    from rich.console import Console
    from rich.progress import Progress

    bad = {}
    with Progress(console=Console(stderr=True), transient=True, disable=len(images) <= PROGRESS_OVER) as bar:
        for path in bar.track(images, description="checking images"):
            problem = image_problem(path)
            if problem is not None:
                bad[path] = problem
    return bad


def drop_bad_images(loaded: list[tuple[Source, list[Record], LoadReport]], skip: bool) -> None:
    """Check every distinct image of the loaded records once, before any run folder exists; all records with a
    bad image in one line, or (skip) drop them from their file's records and count them in its report."""
    images = list(dict.fromkeys(r.image for _, records, _ in loaded for r in records if r.image is not None))
    bad = check_images(images)
    if not bad:
        return
    problems = []
    for source, records, report in loaded:
        for record in records:
            if record.image in bad:
                problem = f"{_where(source)} {record.index}: image {short_path(record.image)} ({bad[record.image]})"
                problems.append(f"{short_path(source.path)} {problem}")
                report.skipped += 1
                report.first_problem = report.first_problem or problem
        records[:] = [r for r in records if r.image not in bad]
        report.kept = len(records)
    if not skip:
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        counted = "1 record has" if len(problems) == 1 else f"{len(problems)} records have"
        raise Lav2Error(f"{counted} an unreadable image: {'; '.join(problems[:SHOWN_PROBLEMS])}"
                        f"{more}; replace the images, or set train.skip_bad_records: true to skip those records")


def prepare(recipe: Recipe, tokenizer, preprocess: Preprocess | None) -> PreparedData:
    """Check the recipe's data files, load and check every record and image, and build the per-kind mixtures."""
    check_data_files(recipe)
    skip = recipe.train.skip_bad_records
    kinds = (("instruction", recipe.data.instruction), ("caption", recipe.data.caption))
    loaded = {kind: [(source, *load_source(source, skip_bad=skip)) for source in sources] for kind, sources in kinds}
    drop_bad_images([item for items in loaded.values() for item in items], skip)
    reports, mixtures, dropped = [], {}, 0
    for kind, sources in kinds:
        datasets = []
        for source, records, report in loaded[kind]:
            dataset = SourceDataset(records, tokenizer, recipe.prompt_style, recipe.train.max_seq_len, source.path)
            if not len(dataset):
                raise Lav2Error(f"{short_path(source.path)}: no usable records (read {len(records) + report.skipped}, "
                                f"skipped {report.skipped} bad, dropped {dataset.dropped} longer than "
                                f"train.max_seq_len {recipe.train.max_seq_len}); fix the file or the settings")
            reports.append(report)
            dropped += dataset.dropped
            datasets.append(dataset)
        mixtures[kind] = Mixture(datasets, [s.weight for s in sources]) if datasets else None
    return PreparedData(mixtures["instruction"], mixtures["caption"], reports, dropped, tokenizer.pad_id,
                        preprocess, skip)
