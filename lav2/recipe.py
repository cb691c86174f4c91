"""The YAML recipe of `lav2 finetune`: schema with defaults, validation with one-line errors, `--set` overrides.

The schema is the dataclass tree below; `_build` walks it generically, so a field added to a dataclass is
parsed, type-checked and listed in "did you mean" suggestions with no other change. Every error names the
recipe file and line (or the `--set` argument it came from).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from lav2.errors import Lav2Error

FORMATS = {"instruction": ("alpaca", "llava"), "caption": ("coco", "captions")}

# Where each public data set comes from, by file or folder name; recipes/README.md has the full picture.
DATA_URLS = {
    "alpaca_data.json": "https://github.com/tatsu-lab/stanford_alpaca/raw/main/alpaca_data.json",
    "alpaca_gpt4_data.json":
        "https://github.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM/raw/main/data/alpaca_gpt4_data.json",
    "llava_instruct_150k.json":
        "https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K/raw/main/llava_instruct_150k.json",
    "captions_train2014.json": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",
}


@dataclass(frozen=True)
class Source:
    """One data file. `image_root` holds the images its records name (default: the data file's folder)."""

    path: Path
    format: str
    image_root: Path | None = None
    weight: float = 1.0  # sampling weight: records of this source appear `weight` times per epoch on average


@dataclass(frozen=True)
class Data:
    instruction: tuple[Source, ...] = ()
    caption: tuple[Source, ...] = ()


@dataclass(frozen=True)
class LearningRates:
    """Peak learning rate of each disjoint parameter group (DESIGN.md §1.4)."""

    visual: float = 1.25e-5
    language: float = 1.25e-4


@dataclass(frozen=True)
class Train:
    epochs: int | None = None  # exactly one of epochs / steps; neither means epochs: 1
    steps: int | None = None
    micro_batch_size: int = 4
    global_batch_size: int = 32
    lr: LearningRates = LearningRates()
    weight_decay: float = 0.02
    decay_on_gates_norms: bool = False  # the official code (timm style) puts no decay on gates, norms, biases
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr: float = 0.0
    max_seq_len: int = 512
    precision: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    load_in_8bit: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 1000  # optimizer steps; 0 saves only at the end
    caption_ratio: float | None = None  # fraction of steps that are caption steps; None: 0.5 with both kinds
    phase_mode: Literal["joint", "two-phase"] = "joint"
    visual_steps: int | None = None  # two-phase: caption-only steps before the instruction phase
    grad_clip: float | None = 1.0  # None disables clipping
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    skip_bad_records: bool = False
    group_by_length: bool = True  # instruction micro-batches of records of similar length: far less padding
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class Recipe:
    base: str  # registry name ("7b", "llama-7b") or a model folder (made absolute)
    layout: str = "paper-7b"  # a preset name of lav2.model.PRESETS
    prompt_style: Literal["alpaca", "chat"] = "alpaca"  # the template training uses; chat must use the same
    data: Data = Data()
    train: Train = Train()
    output: Path | None = None  # default: runs/<recipe name> under the current folder
    path: Path = field(default=Path("recipe.yaml"), metadata={"internal": True})  # the recipe file itself


class _Map(dict):
    """A YAML mapping that remembers where each key came from ("file line N" or "--set a.b=v")."""

    origin: str = ""
    key_origin: dict[str, str]


def _loader(file: str) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Map:
        result = _Map()
        result.origin = f"{file} line {node.start_mark.line + 1}"
        result.key_origin = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            where = f"{file} line {key_node.start_mark.line + 1}"
            if key in result:
                raise Lav2Error(f"{where}: key {key!r} appears twice; keep one of them")
            result[key] = loader.construct_object(value_node, deep=True)
            result.key_origin[str(key)] = where
        return result

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is tuple:
        return "a list of mappings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
            Path: "a path string", type(None): "null"}.get(tp, str(tp))


def _shape_matches(tp: object, value: object) -> bool:
    """Whether `value` has the shape of a schema type that the walker descends into."""
    return ((dataclasses.is_dataclass(tp) and isinstance(value, dict))
            or (typing.get_origin(tp) is tuple and isinstance(value, list)))


def _convert(tp: object, value: object, where: str, key: str, base_dir: Path) -> object:
    """Check `value` against the type hint `tp` and convert it; raise a one-line Lav2Error otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _convert(option, value, where, key, base_dir)
                except Lav2Error:
                    # A mapping or list given where a schema expects one: its own error (an unknown key, a wrong
                    # type further down) says more than "must be a mapping or null".
                    if _shape_matches(option, value):
                        raise
        expected = " or ".join(_type_name(o) for o in options)
        raise Lav2Error(f"{where}: {key} must be {expected}, not {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise Lav2Error(f"{where}: {key} is {value!r}; {hint}choose one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise Lav2Error(f"{where}: {key} must be a list of mappings (YAML '- path: ...'), not {value!r}")
        return tuple(_convert(item_type, item, getattr(item, "origin", where), f"{key}[{i}]", base_dir)
                     for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section (`train:` with nothing under it) means all defaults
            value = {}
        if not isinstance(value, dict):
            raise Lav2Error(f"{where}: {key} must be a mapping, not {value!r}")
        return _build(tp, value, key, base_dir)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Path and isinstance(value, str) and value:
        return (base_dir / Path(value).expanduser()).resolve()
    ok = {bool: isinstance(value, bool), str: isinstance(value, str), dict: isinstance(value, dict),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}.get(tp, False)
    if not ok:
        raise Lav2Error(f"{where}: {key} must be {_type_name(tp)}, not {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, mapping: dict, prefix: str, base_dir: Path):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    key_origin = getattr(mapping, "key_origin", {})
    kwargs = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        where = key_origin.get(str(key), getattr(mapping, "origin", ""))
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
            raise Lav2Error(f"{where}: unknown key {str(key)!r}{f' in {prefix}' if prefix else ''}; {hint}")
        kwargs[key] = _convert(hints[key], value, where, name, base_dir)
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise Lav2Error(f"{getattr(mapping, 'origin', '')}: {prefix or 'the recipe'} needs "
                        f"{', '.join(repr(m) for m in missing)}; see recipes/README.md for an example")
    return cls(**kwargs)


def _apply_override(raw: _Map, item: str) -> None:
    """Put `a.b.c=value` into the raw mapping, remembering that it came from --set."""
    keys, sep, text = item.partition("=")
    if not sep or not keys.strip():
        raise Lav2Error(f"--set {item!r}: expected KEY=VALUE, for example --set train.steps=100")
    where = f"--set {item}"
    node = raw
    parts = keys.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = _Map()
            child.origin, child.key_origin = where, {}
            node[part] = child
            node.key_origin[part] = where
        elif not isinstance(child, dict):
            raise Lav2Error(f"{where}: {part!r} is not a mapping, so it has no key {parts[-1]!r}")
        node = child
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node[parts[-1]] = value
    node.key_origin[parts[-1]] = where


def _check(recipe: Recipe, raw: _Map) -> Recipe:
    """Range and consistency checks that the types alone do not express."""
    t = recipe.train

    def where(*keys: str) -> str:
        node = raw
        for key in keys[:-1]:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        origin = getattr(node, "key_origin", {}).get(keys[-1]) or str(recipe.path)
        return f"{origin}: {'.'.join(keys)}"

    for name in ("micro_batch_size", "global_batch_size", "max_seq_len"):
        if getattr(t, name) <= 0:
            raise Lav2Error(f"{where('train', name)} is {getattr(t, name)}; it must be a positive integer")
    for name in ("epochs", "steps", "visual_steps"):
        if getattr(t, name) is not None and getattr(t, name) <= 0:
            raise Lav2Error(f"{where('train', name)} is {getattr(t, name)}; it must be a positive integer")
    for name in ("warmup_steps", "checkpoint_every", "seed"):
        if getattr(t, name) < 0:
            raise Lav2Error(f"{where('train', name)} is {getattr(t, name)}; it must be 0 or more")
    if t.global_batch_size % t.micro_batch_size:
        raise Lav2Error(f"{where('train', 'global_batch_size')} is {t.global_batch_size}, not a multiple of "
                        f"train.micro_batch_size {t.micro_batch_size}; make it {t.micro_batch_size} x the "
                        f"number of accumulation steps")
    for group in ("visual", "language"):
        if getattr(t.lr, group) < 0:
            raise Lav2Error(f"{where('train', 'lr', group)} is {getattr(t.lr, group)}; "
                            f"a learning rate must be 0 or more (0 freezes the group)")
    for name in ("weight_decay", "min_lr"):
        if getattr(t, name) < 0:
            raise Lav2Error(f"{where('train', name)} is {getattr(t, name)}; it must be 0 or more")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise Lav2Error(f"{where('train', 'grad_clip')} is {t.grad_clip}; use a positive norm, or null for none")
    if t.epochs is not None and t.steps is not None:
        raise Lav2Error(f"{where('train', 'steps')}: give train.epochs or train.steps, not both")
    if (t.phase_mode == "two-phase") != (t.visual_steps is not None):
        raise Lav2Error(f"{where('train', 'phase_mode')} is {t.phase_mode!r}: train.visual_steps is needed "
                        f"with 'two-phase' and only then")
    for kind, sources in (("instruction", recipe.data.instruction), ("caption", recipe.data.caption)):
        for i, source in enumerate(sources):
            at = f"{where('data', kind)}[{i}]"
            if source.format not in FORMATS[kind]:
                other = "caption" if kind == "instruction" else "instruction"
                close = difflib.get_close_matches(source.format, FORMATS[kind], n=1)
                hint = (f"it is a {other} format: list it under data.{other}" if source.format in FORMATS[other]
                        else (f"did you mean {close[0]!r}? " if close else "") +
                        f"choose one of {', '.join(FORMATS[kind])}")
                raise Lav2Error(f"{at}.format is {source.format!r}; {hint}")
            if source.weight <= 0:
                raise Lav2Error(f"{at}.weight is {source.weight}; a sampling weight must be positive")
            if source.format == "coco" and source.image_root is None:
                raise Lav2Error(f"{at}: a coco source needs image_root (the folder of its images, "
                                f"e.g. data/coco/train2014)")
    if not recipe.data.instruction and not recipe.data.caption:
        raise Lav2Error(f"{recipe.path}: data has no instruction or caption sources; add data.instruction "
                        f"(e.g. '- {{path: data/alpaca_data.json, format: alpaca}}'), see recipes/README.md")
    ratio = t.caption_ratio
    if ratio is None:
        ratio = 0.5 if recipe.data.caption and recipe.data.instruction else float(bool(recipe.data.caption))
    elif not 0 <= ratio <= 1:
        raise Lav2Error(f"{where('train', 'caption_ratio')} is {ratio}; it is a fraction of steps, from 0 to 1")
    elif (ratio > 0 and not recipe.data.caption) or (ratio < 1 and not recipe.data.instruction):
        empty = "caption" if ratio > 0 and not recipe.data.caption else "instruction"
        raise Lav2Error(f"{where('train', 'caption_ratio')} is {ratio} but data.{empty} is empty; "
                        f"add {empty} sources or change the ratio")
    _check_layout(recipe, where("layout"))
    epochs = 1 if t.epochs is None and t.steps is None else t.epochs
    output = recipe.output or (Path.cwd() / "runs" / recipe.path.stem)
    return dataclasses.replace(recipe, output=output, train=dataclasses.replace(t, epochs=epochs,
                                                                                caption_ratio=ratio))


def _check_layout(recipe: Recipe, where: str) -> None:
    try:
        from lav2.model import PRESETS  # lazy: the model module is heavy and optional for validation
    except ImportError:
        return
    if recipe.layout not in PRESETS:
        close = difflib.get_close_matches(recipe.layout, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise Lav2Error(f"{where} is {recipe.layout!r}, not a known layout; {hint}choose one of {', '.join(PRESETS)}")


def _resolve_base(base: str, base_dir: Path, where: str) -> str:
    if not base.strip():
        raise Lav2Error(f"{where}: base is empty; give a registry name like llama-7b or a model folder path")
    # A name with a slash or a leading dot/tilde is a folder, taken relative to the recipe; else a registry name.
    if "/" in base or "\\" in base or base.startswith((".", "~")):
        return str((base_dir / Path(base).expanduser()).resolve())
    return base


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override (`a.b=value` strings, values as YAML scalars) and validate a recipe; paths become absolute.

    Data files are not opened here: call `check_data_files` before loading data.
    """
    path = Path(path)
    if not path.is_file():
        raise Lav2Error(f"recipe not found: {path}; pass the path of a YAML recipe such as recipes/alpaca.yaml")
    try:
        # utf-8-sig: a byte-order mark, as Windows editors write, is read as no text
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_loader(str(path)))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = " ".join(str(e.problem or e).split())
        raise Lav2Error(f"{path}{line}: not valid YAML ({problem}); check the indentation and quoting") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise Lav2Error(f"{path}: not a readable YAML file ({' '.join(str(e).split())})") from None
    if not isinstance(raw, _Map):
        raise Lav2Error(f"{path}: a recipe is a YAML mapping (base:, data:, train:, output:), not {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    base_dir = path.parent.resolve()
    recipe = _build(Recipe, raw, "", base_dir)
    recipe = dataclasses.replace(recipe, path=path.resolve(),
                                 base=_resolve_base(recipe.base, base_dir, raw.key_origin.get("base", str(path))))
    return _check(recipe, raw)


def short_path(path: Path) -> str:
    """A path relative to the current folder when it is under it: messages stay short."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_data_files(recipe: Recipe) -> None:
    """Raise one Lav2Error listing every missing data file or image folder, with where to get each."""
    missing = []
    for kind, sources in (("instruction", recipe.data.instruction), ("caption", recipe.data.caption)):
        for i, source in enumerate(sources):
            for p, what in ((source.path, "file"), (source.image_root, "image folder")):
                if p is not None and not p.exists():
                    url = DATA_URLS.get(p.name)
                    missing.append(f"{short_path(p)} (data.{kind}[{i}] {what}" + (f", from {url})" if url else ")"))
    if missing:
        raise Lav2Error(f"{recipe.path.name}: missing data: {'; '.join(missing)}; "
                        f"see recipes/README.md for where to get each data set and the folder layout")
