"""Recipes: defaults, paths, overrides, the shipped recipes, and the corpus of bad inputs in tests/bad_inputs/.

Each file of the corpus is a recipe whose `# expect:` lines are phrases the one-line error must contain and
whose `# set:` lines are --set overrides. The whole path a user's recipe takes is run: load, prepare, collate.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lav2 import recipe as recipe_module
from lav2.data import collate, prepare
from lav2.errors import Lav2Error
from lav2.recipe import Recipe, check_data_files, load_recipe
from conftest import EXAMPLES, ROOT

BAD = sorted((ROOT / "tests" / "bad_inputs").glob("*.yaml"))


def header(path: Path, tag: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith(f"# {tag}:")]


def run_recipe(path: Path, tokenizer, preprocess, overrides=()) -> None:
    """What `lav2 finetune` does with the data before training: every record loaded, tokenized and collated."""
    recipe = load_recipe(path, overrides)
    data = prepare(recipe, tokenizer, preprocess)
    for mixture in (data.instruction, data.caption):
        if mixture is not None:
            collate([mixture[i] for i in range(len(mixture))], tokenizer.pad_id, preprocess)


def test_the_corpus_is_big_enough():
    assert len(BAD) >= 20
    assert all(header(path, "expect") for path in BAD)


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_input_gives_one_line_lav2error(path, data_tokenizer, preprocess):
    with pytest.raises(Lav2Error) as info:
        run_recipe(path, data_tokenizer, preprocess, header(path, "set"))
    message = str(info.value)
    assert "\n" not in message
    for phrase in header(path, "expect"):
        assert phrase in message


def test_defaults_and_paths_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text("base: llama-7b\ndata:\n  instruction:\n    - {path: ../d.json, format: alpaca}\n")
    recipe = load_recipe(path)
    assert recipe.base == "llama-7b" and recipe.layout == "paper-7b" and recipe.prompt_style == "alpaca"
    assert recipe.data.instruction[0].path == tmp_path / "d.json"
    assert recipe.train.epochs == 1 and recipe.train.steps is None
    assert recipe.train.caption_ratio == 0.0
    assert recipe.output == Path.cwd() / "runs" / "r"


def test_a_base_with_a_slash_is_a_folder_relative_to_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: ./models/mine\noutput: out\ndata: {instruction: [{path: d.json, format: alpaca}]}\n")
    recipe = load_recipe(path)
    assert recipe.base == str(tmp_path / "models" / "mine")
    assert recipe.output == tmp_path / "out"


def test_overrides_are_parsed_as_yaml_and_validated():
    recipe = load_recipe(EXAMPLES / "example.yaml",
                         ["train.steps=100", "train.lr.visual=2e-4", "train.precision=bfloat16", "output=x"])
    assert recipe.train.steps == 100 and recipe.train.lr.visual == 2e-4
    assert recipe.train.lr.language == 1e-3  # the sibling key of the file is kept
    assert recipe.train.precision == "bfloat16"
    assert recipe.output == EXAMPLES / "x"


@pytest.mark.parametrize("name", ["alpaca_coco.yaml", "alpaca.yaml"])
def test_shipped_recipes_load_and_name_their_missing_data_with_urls(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    assert isinstance(recipe, Recipe) and recipe.base == "llama-7b" and recipe.layout == "paper-7b"
    if (ROOT / "data" / "alpaca_data.json").exists():
        pytest.skip("the data is present here")
    with pytest.raises(Lav2Error) as info:
        check_data_files(recipe)
    message = str(info.value)
    assert "\n" not in message and "alpaca_data.json" in message and "https://" in message


@pytest.mark.parametrize("name", ["alpaca_coco.yaml", "alpaca.yaml"])
def test_shipped_7b_recipes_fit_a_24_gb_gpu_as_shipped(name):
    from lav2 import memory
    from lav2.checkpoint import DEFAULT_CLIP, DTYPES, clip_params
    from lav2.model import Config

    t = load_recipe(ROOT / "recipes" / name).train
    need = memory.training_bytes(Config.from_name("paper-7b"), dtype=DTYPES[t.precision], load_in_8bit=t.load_in_8bit,
                                 checkpointing=t.gradient_checkpointing, micro_batch=t.micro_batch_size,
                                 seq_len=t.max_seq_len, clip_params=clip_params(DEFAULT_CLIP))
    assert t.load_in_8bit and t.gradient_checkpointing and need < 22 * 2**30  # 24 GB, less what the driver keeps


def test_the_joint_recipe_mixes_alpaca_and_coco():
    recipe = load_recipe(ROOT / "recipes" / "alpaca_coco.yaml")
    assert [s.format for s in recipe.data.instruction] == ["alpaca"]
    assert [s.format for s in recipe.data.caption] == ["coco"]
    assert recipe.train.caption_ratio == 0.5 and recipe.train.global_batch_size % recipe.train.micro_batch_size == 0


@pytest.mark.skipif(not (ROOT / "lav2" / "finetune.py").exists(), reason="lav2 finetune is not written yet")
@pytest.mark.parametrize("name", ["unknown_key", "caption_ratio_2", "missing_file"])
def test_cli_prints_one_line_and_fails(name):
    result = subprocess.run([sys.executable, "-c", "from lav2.cli import main; main()", "finetune",
                             str(ROOT / "tests" / "bad_inputs" / f"{name}.yaml")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert all(phrase in result.stderr for phrase in header(ROOT / "tests" / "bad_inputs" / f"{name}.yaml",
                                                            "expect"))


DATA = "data:\n  instruction:\n    - {path: d.json, format: alpaca}\n"


def _error(tmp_path: Path, text: str, overrides=()) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(Lav2Error) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message and (message.startswith(f"{path} line ") or message.startswith("--set "))
    return message


@pytest.mark.parametrize("text, line, expected", [
    ("bsae: llama-7b\n" + DATA, 1, "unknown key 'bsae'; did you mean 'base'?"),
    ("base: llama-7b\n" + DATA + "train:\n  stpes: 3\n", 6, "unknown key 'stpes' in train; did you mean 'steps'?"),
    ("base: llama-7b\n" + DATA + "train:\n  lr:\n    visul: 1.0e-4\n", 7,
     "unknown key 'visul' in train.lr; did you mean 'visual'?"),
    ("base: llama-7b\n" + DATA + "    - {path: e.json, format: alpaca, wieght: 2}\n", 5,
     "unknown key 'wieght' in data.instruction[1]; did you mean 'weight'?"),
    ("base: llama-7b\ndata:\n  instrcution: []\n", 3, "unknown key 'instrcution' in data; did you mean 'instruction'?"),
])
def test_unknown_key_names_the_key_and_its_mapping_at_every_depth(tmp_path, text, line, expected):
    message = _error(tmp_path, text)
    assert f"line {line}: {expected}" in message


def test_unknown_key_from_set_names_its_mapping(tmp_path):
    message = _error(tmp_path, "base: llama-7b\n" + DATA, ["train.lr.visul=1"])
    assert message == "--set train.lr.visul=1: unknown key 'visul' in train.lr; did you mean 'visual'?"


@pytest.mark.parametrize("text, expected", [
    ("train:\n  lr:\n    visual: fast\n", "line 7: train.lr.visual must be a number, not 'fast'"),
    ("train:\n  lr: 5\n", "line 6: train.lr must be a mapping, not 5"),
    ("    - {path: e.json, format: alpaca, weight: heavy}\n", "line 5: data.instruction[1].weight must be a number"),
    ("    - {path: e.json, format: alpaca, image_root: 7}\n",
     "line 5: data.instruction[1].image_root must be a path string or null, not 7"),
])
def test_wrong_type_in_a_nested_mapping_names_its_full_path(tmp_path, text, expected):
    assert expected in _error(tmp_path, "base: llama-7b\n" + DATA + text)


@dataclass(frozen=True)
class Leaf:
    rate: float = 1.0


@dataclass(frozen=True)
class Branch:
    leaf: Leaf | None = None
    leaves: tuple[Leaf, ...] = ()


@dataclass(frozen=True)
class Tree:
    branch: Branch = Branch()


@pytest.mark.parametrize("text, expected", [
    ("branch: {leaf: {rtae: 2}}", "unknown key 'rtae' in branch.leaf; did you mean 'rate'?"),
    ("branch: {leaves: [{rate: 1}, {rtae: 2}]}", "unknown key 'rtae' in branch.leaves[1]; did you mean 'rate'?"),
    ("branch: {leaf: {rate: fast}}", "branch.leaf.rate must be a number, not 'fast'"),
    ("branch: {leaf: 5}", "branch.leaf must be a mapping or null, not 5"),
])
def test_the_schema_walker_names_paths_through_optional_and_list_fields(text, expected):
    """A schema deeper than today's recipe: an optional mapping keeps the error of what is inside it."""
    raw = yaml.load(text, Loader=recipe_module._loader("t.yaml"))
    with pytest.raises(Lav2Error) as info:
        recipe_module._build(Tree, raw, "", Path.cwd())
    assert str(info.value) == f"t.yaml line 1: {expected}"


def test_recipe_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + ("base: llama-7b\n" + DATA + "train:\n  steps: 7\n").encode())
    recipe = load_recipe(path)
    assert recipe.base == "llama-7b" and recipe.train.steps == 7
    path.write_bytes(b"\xef\xbb\xbf" + ("base: llama-7b\n" + DATA + "train:\n  stpes: 7\n").encode())
    with pytest.raises(Lav2Error) as info:
        load_recipe(path)
    assert f"{path} line 6: unknown key 'stpes' in train" in str(info.value)  # lines count as without the mark
