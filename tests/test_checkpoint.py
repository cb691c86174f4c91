"""Import of Meta, Hugging Face and official LLaMA-Adapter V2 weights; lav2 folders; merge; bad input."""

import errno
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

import lav2
from conftest import lav2_to_official, make_image, random_llama, write_meta_folder
from lav2 import checkpoint, fastpath
from lav2.images import make_preprocess
from lav2.errors import Lav2Error
from lav2.model import Config, adapter_state_dict


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lav2.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def assert_one_line_error(result, *phrases):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def no_partial_folders(parent: Path):
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


TOKENS = torch.tensor([[1, 5, 17, 42, 99, 100, 250, 3, 8], [1, 64, 2, 7, 7, 9, 31, 150, 299]])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return folder, model


def test_hf_import_through_cli_matches_transformers(hf_folder, tmp_path):
    folder, reference = hf_folder
    result = run_cli("download", folder, "--out", tmp_path / "model")
    assert result.returncode == 0, result.stderr
    loaded = lav2.load(tmp_path / "model", device="cpu")
    with torch.no_grad():
        expected = reference(TOKENS).logits
        got = loaded.model(TOKENS)
    assert got.dtype == torch.float32 and got.shape == (2, 9, 320)
    assert (got - expected).abs().max() <= 1e-5


def test_streamed_import_in_shards_writes_the_same_tensors_bit_for_bit(hf_folder, tmp_path, monkeypatch):
    """One file or many small shards, each written and dropped before the next is read: the same weights."""
    from safetensors.torch import load_file

    folder, _ = hf_folder
    whole = checkpoint.import_model(folder, tmp_path / "whole")
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 40_000)
    sharded = checkpoint.import_model(folder, tmp_path / "sharded")
    files = sorted(sharded.glob("model-*.safetensors"))
    assert len(files) > 3 and all(f.stat().st_size < 40_000 + 70_000 for f in files)
    assert json.loads((sharded / checkpoint.CONFIG_FILE).read_text())["weights"] == [f.name for f in files]
    one = load_file(whole / checkpoint.WEIGHTS_FILE)
    many = {k: v for f in files for k, v in load_file(f).items()}
    assert one.keys() == many.keys()
    assert all(one[k].dtype == many[k].dtype and torch.equal(one[k], many[k]) for k in one)
    with torch.no_grad():
        assert torch.equal(lav2.load(whole, device="cpu").model(TOKENS), lav2.load(sharded, device="cpu").model(TOKENS))


def test_hf_pytorch_bin_import(hf_folder, tmp_path):
    folder, reference = hf_folder
    bin_folder = tmp_path / "bin"
    reference.save_pretrained(bin_folder, safe_serialization=False)
    (bin_folder / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    out = checkpoint.import_model(bin_folder, tmp_path / "model")
    with torch.no_grad():
        assert (lav2.load(out, device="cpu").model(TOKENS) - reference(TOKENS).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_import_matches_the_original_model(tmp_path, tokenizer_path, shards):
    model = random_llama(Config.from_name("tiny"), seed=11).eval()
    meta = write_meta_folder(tmp_path / "meta", model, tokenizer_path, shards=shards)
    result = run_cli("download", meta, "--out", tmp_path / "model")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        assert (lav2.load(tmp_path / "model", device="cpu").model(TOKENS) - model(TOKENS)).abs().max() <= 1e-5


def test_meta_download_layout_with_size_subfolder(tmp_path, tokenizer_path):
    """Meta's own download: tokenizer.model at the top, weights in 7B/."""
    model = random_llama(Config.from_name("tiny"), seed=12).eval()
    write_meta_folder(tmp_path / "LLaMA" / "7B", model, tokenizer_path)
    (tmp_path / "LLaMA" / "tokenizer.model").write_bytes((tmp_path / "LLaMA" / "7B" / "tokenizer.model").read_bytes())
    (tmp_path / "LLaMA" / "7B" / "tokenizer.model").unlink()
    out = checkpoint.import_model(tmp_path / "LLaMA", tmp_path / "model")
    with torch.no_grad():
        assert (lav2.load(out, device="cpu").model(TOKENS) - model(TOKENS)).abs().max() <= 1e-5


def adapter_model(layout: str, base, clip_folder: Path, seed: int):
    """A tiny model of `layout`, adapters randomised, over the base weights, with the test CLIP."""
    model = random_llama(Config.from_name(layout), seed=seed)
    model.load_state_dict(base.state_dict(), strict=False)
    model.visual.clip = checkpoint.load_clip(*clip_spec_of(clip_folder), "cpu")[0]
    return model.eval()


def clip_spec_of(clip_folder: Path):
    cfg, visual = checkpoint.read_clip_folder(clip_folder)
    tmp = clip_folder.parent / "clip-visual"
    if not tmp.exists():
        tmp.mkdir()
        checkpoint.save_tensors(visual, tmp / checkpoint.CLIP_FILE)
    return {"config": cfg, "weights": checkpoint.CLIP_FILE}, tmp


@pytest.mark.parametrize("layout, meta", [("tiny-official", {"w_bias": True, "w_lora": False, "lora_rank": 16}),
                                          ("tiny-official-lora", {"w_bias": True, "w_lora": True, "lora_rank": 4})])
def test_official_checkpoint_loads_back_with_identical_logits(tmp_path, tiny_base, clip_folder, layout, meta):
    meta_folder, _, base = tiny_base
    model = adapter_model(layout, base, clip_folder, seed=21)
    pth = tmp_path / "abc_LORA-BIAS-7B.pth"
    torch.save({"model": lav2_to_official(model), "config": meta}, pth)
    result = run_cli("download", meta_folder, "--adapter", pth, "--clip", clip_folder, "--out", tmp_path / "model")
    assert result.returncode == 0, result.stderr
    loaded = lav2.load(tmp_path / "model", device="cpu")
    assert loaded.info["prompt_style"] == "alpaca" and loaded.config.bgr
    assert loaded.info["layout"] == ("official-lora-bias-7b" if meta["w_lora"] else "official-bias-7b")
    image = Image.open(make_image(tmp_path / "red.png"))
    pixels = loaded.preprocess(image)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(TOKENS, pixels.expand(2, -1, -1, -1)), model(TOKENS, pixels.expand(2, -1, -1, -1)))
        assert torch.equal(loaded.model(TOKENS), model(TOKENS))


def test_a_loading_model_holds_its_matrices_once(tiny_official, monkeypatch):
    """load reads one tensor at a time and stores the block matrices anew for decoding (store_for_decoding_): the
    memory each was read into must be freed as that happens, or a 7B model would briefly sit in memory twice."""
    read, freed_when_laid_out = [], []
    read_tensors, store_for_decoding_ = checkpoint.read_tensors, fastpath.store_for_decoding_

    def recording(files, device="cpu"):
        for key, tensor in read_tensors(files, device):
            if key.startswith("layers.") and key.endswith(".weight") and tensor.ndim == 2:
                read.append(weakref.ref(tensor.untyped_storage()))
            yield key, tensor

    def laying_out(model):
        store_for_decoding_(model)
        gc.collect()
        freed_when_laid_out.extend(storage() is None for storage in read)

    monkeypatch.setattr(checkpoint, "read_tensors", recording)
    monkeypatch.setattr(fastpath, "store_for_decoding_", laying_out)
    loaded = lav2.load(tiny_official[1], device="cpu")
    assert loaded.model.layers[0].attention.wq.weight.t().is_contiguous()  # laid out for decoding
    assert len(freed_when_laid_out) == 7 * len(loaded.model.layers) and all(freed_when_laid_out)


def test_bgr_layouts_swap_channels(tiny_official, tmp_path):
    loaded = lav2.load(tiny_official[1], device="cpu")
    image = Image.open(make_image(tmp_path / "red.png", colour=(250, 0, 0)))
    bgr = loaded.preprocess(image)
    rgb = make_preprocess(lambda im: torch.tensor(list(im.getpixel((24, 24)))), bgr=False)(image)
    swapped = make_preprocess(lambda im: torch.tensor(list(im.getpixel((24, 24)))), bgr=True)(image)
    assert rgb.tolist() == [250, 0, 0] and swapped.tolist() == [0, 0, 250]
    assert bgr[2].mean() > bgr[0].mean()  # the red disc arrives in the last channel


def corrupt(state: dict, how: str) -> dict:
    state = dict(state)
    if how == "missing":
        del state["llama.layers.2.attention.gate"]
    elif how == "extra":
        state["llama.layers.0.attention.wk.bias"] = torch.zeros(64)
    elif how == "shape":
        state["llama.layers.1.attention.wq.bias"] = torch.zeros(65)
    return state


@pytest.mark.parametrize("how, phrase", [("missing", "missing (1): layers.2.attention.gate"),
                                         ("extra", "unexpected (1): layers.0.attention.wk.bias"),
                                         ("shape", "wrong shape (1): layers.1.attention.wq.bias (65,) != (64,)")])
def test_official_checkpoint_with_bad_keys_is_refused_in_one_line(tmp_path, tiny_base, clip_folder, how, phrase):
    meta_folder, _, base = tiny_base
    model = adapter_model("tiny-official", base, clip_folder, seed=22)
    pth = tmp_path / "bad.pth"
    torch.save({"model": corrupt(lav2_to_official(model), how), "config": {"w_bias": True}}, pth)
    result = run_cli("download", meta_folder, "--adapter", pth, "--clip", clip_folder, "--out", tmp_path / "model")
    assert_one_line_error(result, phrase)
    assert not (tmp_path / "model").exists() and no_partial_folders(tmp_path)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/lav2-pwned",))


def bad_sources(tmp_path: Path, tiny_base, tokenizer_path) -> dict:
    meta_folder = tiny_base[0]
    cases = {}
    cases["missing folder"] = (tmp_path / "nope", ["no such folder"])
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in meta_folder.iterdir():
        if f.name != "tokenizer.model":
            (no_tok / f.name).write_bytes(f.read_bytes())
    cases["missing tokenizer"] = (no_tok, ["no tokenizer.model"])
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "weights.bin").write_bytes(b"hello")
    cases["unknown format"] = (unknown, ["unknown format"])
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in meta_folder.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".pth" else data)
    cases["truncated"] = (truncated, ["truncated"])
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in meta_folder.iterdir():
        if f.suffix != ".pth":
            (evil / f.name).write_bytes(f.read_bytes())
    torch.save({"tok_embeddings.weight": RunsCode()}, evil / "consolidated.00.pth")
    cases["code-running pickle"] = (evil, ["not a weights-only checkpoint"])
    bad_tok = tmp_path / "bad-tok"
    bad_tok.mkdir()
    for f in meta_folder.iterdir():
        (bad_tok / f.name).write_bytes(b"not sentencepiece" if f.name == "tokenizer.model" else f.read_bytes())
    cases["broken tokenizer"] = (bad_tok, ["not a SentencePiece model"])
    return cases


def test_bad_sources_give_one_line_and_no_output(tmp_path, tiny_base, tokenizer_path):
    if Path("/tmp/lav2-pwned").exists():
        Path("/tmp/lav2-pwned").unlink()
    for name, (src, phrases) in bad_sources(tmp_path, tiny_base, tokenizer_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = run_cli("download", src, "--out", out)
        assert_one_line_error(result, *phrases)
        assert not out.exists(), name
    assert no_partial_folders(tmp_path)
    assert not Path("/tmp/lav2-pwned").exists()


def test_bad_adapter_files(tmp_path, tiny_base, clip_folder):
    meta_folder = tiny_base[0]
    not_official = tmp_path / "plain.pth"
    torch.save({"weights": torch.zeros(2)}, not_official)
    evil = tmp_path / "evil.pth"
    torch.save({"model": RunsCode()}, evil)
    inconsistent = tmp_path / "inconsistent.pth"
    torch.save({"model": {"adapter_query.weight": torch.zeros(12, 64)}, "config": {"w_lora": True}}, inconsistent)
    for pth, phrase in [(tmp_path / "absent.pth", "not found"), (not_official, "not an official"),
                        (evil, "not a weights-only checkpoint"), (inconsistent, "w_lora=True")]:
        result = run_cli("download", meta_folder, "--adapter", pth, "--clip", clip_folder, "--out", tmp_path / "out")
        assert_one_line_error(result, phrase)
        assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_refused(tiny_base, tmp_path):
    (tmp_path / "taken").mkdir()
    assert_one_line_error(run_cli("download", tiny_base[0], "--out", tmp_path / "taken"), "already exists")


def test_load_rejects_non_model_folders(tmp_path):
    with pytest.raises(Lav2Error, match="no such model folder"):
        lav2.load(tmp_path / "absent")
    with pytest.raises(Lav2Error, match="not a lav2 model folder"):
        lav2.load(tmp_path)


def write_run(tmp_path: Path, base_folder: Path, clip_folder: Path, layout: str, seed: int) -> tuple[Path, object]:
    """A fine-tune-like folder: a "base" link plus a random adapter of `layout`."""
    base = lav2.load(base_folder, device="cpu").model
    model = adapter_model(layout, base, clip_folder, seed)
    cfg, visual = checkpoint.read_clip_folder(clip_folder)
    out = tmp_path / f"run-{layout}"
    with checkpoint.atomic_folder(out) as tmp:
        checkpoint.write_folder(tmp, config=model.config, layout=layout, tokenizer=base_folder / "tokenizer.model",
                                base=os.path.relpath(base_folder, out), adapter=adapter_state_dict(model),
                                clip_spec={"config": cfg, "weights": checkpoint.CLIP_FILE}, clip_weights=visual)
    return out, model


@pytest.mark.parametrize("layout", ["tiny-paper", "tiny-official", "tiny-official-lora"])
def test_merge_keeps_logits(tmp_path, tiny_base, clip_folder, layout):
    run, model = write_run(tmp_path, tiny_base[1], clip_folder, layout, seed=31)
    result = run_cli("merge", run, "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    before, after = lav2.load(run, device="cpu"), lav2.load(tmp_path / "merged", device="cpu")
    info = json.loads((tmp_path / "merged" / "lav2.json").read_text())
    assert info["base"] is None and info["weights"]  # self-contained
    assert not after.config.scale_targets and set(after.config.lora_targets if after.config.lora_rank else ()) <= {"wk", "wv"}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (after.model(TOKENS, images) - before.model(TOKENS, images)).abs().max() <= 1e-5
        assert (after.model(TOKENS, images) - model(TOKENS, images)).abs().max() <= 1e-5
    image = make_image(tmp_path / "red.png")
    chat = run_cli("chat", "--model", tmp_path / "merged", "--image", image, "--prompt", "What colour is it?",
                   "--temperature", "0", "--max-new-tokens", "4")
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr


def test_merge_refuses_to_overwrite(tmp_path, tiny_official):
    (tmp_path / "merged").mkdir()
    assert_one_line_error(run_cli("merge", tiny_official[1], "--out", tmp_path / "merged"), "already exists")
    assert_one_line_error(run_cli("merge", tmp_path / "absent", "--out", tmp_path / "m2"), "no such model folder")


def test_load_in_bfloat16_keeps_every_tensor_in_that_dtype(tiny_official):
    full = lav2.load(tiny_official[1], device="cpu")
    half = lav2.load(tiny_official[1], device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference, got = full.model(TOKENS, images), half.model(TOKENS, images)
    assert got.dtype == torch.float32
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()


# --- write failures and leftovers ----------------------------------------------------------------------------

# what safetensors raises on a full disk: its own error type, the errno only inside the text
FULL_DISK = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def invoke(*args):
    from click.testing import CliRunner
    from lav2.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_cli_one_line(result, *phrases):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.parametrize("error", [SafetensorError(FULL_DISK), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["SafetensorError", "OSError"])
def test_a_full_disk_at_import_and_merge_is_one_line_and_leaves_nothing(tmp_path, tiny_base, tiny_official, monkeypatch,
                                                                        error):
    def full(state, path):
        raise error

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "imported"
    assert_cli_one_line(invoke("download", tiny_base[0], "--out", out),
                        f"could not write model-00001.safetensors in {tmp_path}", "(No space left on device)", "free space")
    assert_cli_one_line(invoke("merge", tiny_official[1], "--out", tmp_path / "merged"),  # the CLIP goes first
                        "could not write clip.safetensors", "(No space left on device)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no .partial folder


def test_a_failing_tokenizer_copy_is_one_line_too(tmp_path, tiny_base, monkeypatch):
    def full(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(checkpoint.shutil, "copyfile", full)
    assert_cli_one_line(invoke("download", tiny_base[0], "--out", tmp_path / "imported"),
                        f"could not write tokenizer.model in {tmp_path}", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_partial_folders_of_killed_writers_are_removed_and_live_ones_kept(tmp_path, tiny_official):
    stale = tmp_path / f".merged.partial-{dead_pid()}-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".merged.partial-{alive.pid}-a1b2"
        live.mkdir()
        result = invoke("merge", tiny_official[1], "--out", tmp_path / "merged")
        assert result.exit_code == 0, result.output
        notes = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(notes) == 1 and "removed 1 partial folder" in notes[0] and stale.name in notes[0], notes
        assert not stale.exists() and live.is_dir() and (tmp_path / "merged" / "lav2.json").is_file()
    finally:
        alive.kill()
        alive.wait()


# --- malformed model folders: every command that reads one says the file and the field ----------------------


def damaged_copy(folder: Path, dest: Path, how: str) -> Path:
    """A copy of a model folder with one thing wrong in it."""
    import shutil

    shutil.copytree(folder, dest)
    path = dest / "lav2.json"
    info = json.loads(path.read_text())
    if how == "list":
        info = [info]
    elif how == "adapter":
        info["adapter"] = 7
    elif how == "dim":
        info["config"]["dim"] = str(info["config"]["dim"])
    elif how == "no-config":
        del info["config"]
    elif how == "no-weights":
        (dest / info["weights"]).unlink()
    path.write_text(json.dumps(info))
    return dest


MALFORMED = {"list": ("lav2.json", "expected a JSON object, found a list"),
             "adapter": ("lav2.json", "the field 'adapter' must be a string or null, not 7"),
             "dim": ("lav2.json", "config.dim must be int"),
             "no-config": ("lav2.json", "the field 'config' is missing"),
             "no-weights": ("lav2.json", "names the weights file 'model.safetensors', which is missing")}


@pytest.mark.parametrize("how", MALFORMED)
def test_malformed_folders_are_one_line_for_chat_and_merge(tmp_path, tiny_base, how):
    folder = damaged_copy(tiny_base[1], tmp_path / "damaged", how)
    for args in (["chat", "--model", folder, "--prompt", "Hi", "--device", "cpu"],
                 ["merge", folder, "--out", tmp_path / "merged"]):
        assert_cli_one_line(invoke(*args), str(folder), *MALFORMED[how])
    assert not (tmp_path / "merged").exists() and no_partial_folders(tmp_path)


def test_json_files_with_a_byte_order_mark_are_read(tmp_path, tiny_base, tokenizer_path):
    meta = tmp_path / "meta"
    import shutil

    shutil.copytree(tiny_base[0], meta)
    params = meta / "params.json"
    params.write_bytes(b"\xef\xbb\xbf" + params.read_bytes())  # as Notepad saves it
    folder = checkpoint.import_model(meta, tmp_path / "lav2")
    info = folder / "lav2.json"
    info.write_bytes(b"\xef\xbb\xbf" + info.read_bytes())
    assert checkpoint.read_folder_info(folder)["format"] == "lav2"
    info.write_text('{"format": "lav2",')
    assert_cli_one_line(invoke("chat", "--model", folder, "--prompt", "Hi"), f"{info}: not valid JSON", "line 1")
    info.write_bytes(b'{"format": "\xff"}')
    assert_cli_one_line(invoke("merge", folder, "--out", tmp_path / "m"), f"{info}: not valid JSON", "UTF-8")


# --- devices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, phrase", [("tpu:3", "device 'tpu:3' is not one torch knows"),
                                            ("mps", "lav2 runs on cpu or cuda, not mps"),
                                            ("cuda:7", "device cuda:7: no such CUDA GPU")])
def test_unknown_or_absent_devices_are_one_line_in_chat(tiny_base, device, phrase):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert_cli_one_line(invoke("chat", "--model", tiny_base[1], "--prompt", "Hi", "--device", device), phrase)
