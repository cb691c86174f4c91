"""`lav2 finetune`: disjoint groups, frozen base, exact resume, checkpointing memory, 8-bit, DDP, faults, demo."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import lav2
from lav2 import checkpoint, finetune
from lav2.cli import main
from lav2.data import IGNORE_INDEX, Batch
from lav2.errors import Lav2Error
from lav2.model import Config, LLaMAAdapter, mark_trainable, param_groups
from lav2.fastpath import quantize_8bit_

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "recipes" / "examples"


@pytest.fixture(scope="session")
def visual_base(tmp_path_factory, tiny_base, clip_folder) -> Path:
    """The tiny random LLaMA as a lav2 base folder that also holds the tiny CLIP."""
    _, folder, _ = tiny_base
    info = checkpoint.read_folder_info(folder)
    clip_config, clip_weights = checkpoint.read_clip_folder(clip_folder)
    out = tmp_path_factory.mktemp("vbase") / "base"
    with checkpoint.atomic_folder(out) as tmp:
        checkpoint.write_folder(tmp, config=Config.from_dict(info["config"]), layout="llama",
                                tokenizer=folder / "tokenizer.model",
                                base_weights=checkpoint.read_safetensors(folder / info["weights"]),
                                clip_spec={"config": clip_config, "weights": checkpoint.CLIP_FILE},
                                clip_weights=clip_weights)
    return out


def write_recipe(folder: Path, base: Path, **train) -> Path:
    """A tiny recipe over the example data files (both kinds), float32 on the CPU."""
    recipe = {
        "base": str(base), "layout": "tiny-paper", "prompt_style": "alpaca",
        "data": {"instruction": [{"path": str(EXAMPLES / "alpaca.json"), "format": "alpaca"},
                                 {"path": str(EXAMPLES / "llava.json"), "format": "llava"}],
                 "caption": [{"path": str(EXAMPLES / "captions.jsonl"), "format": "captions"}]},
        "train": {"steps": 6, "micro_batch_size": 2, "global_batch_size": 4, "lr": {"visual": 1e-2, "language": 1e-2},
                  "max_seq_len": 256, "precision": "float32", "device": "cpu", "checkpoint_every": 2, **train},
        "output": str(folder / "run"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(before: dict, model: torch.nn.Module, names) -> list[str]:
    after = model.state_dict()
    return [n for n in names if not torch.equal(before[n], after[n])]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter.safetensors")


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2.cli", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


# --- the two groups and the frozen base ----------------------------------------------------------------------


def test_caption_step_moves_only_visual_group_and_instruction_step_only_language(tmp_path, visual_base):
    trainer = finetune.start(write_recipe(tmp_path, visual_base))
    model = trainer.loaded.model
    groups = {g: [n for n, _ in named] for g, named in param_groups(model).items()}
    frozen = [n for n in model.state_dict() if n not in groups["visual"] + groups["language"]]
    for kind, moves, stays in (("caption", "visual", "language"), ("instruction", "language", "visual")):
        before = snapshot(model)
        for _ in range(2):  # the first step opens the zero-initialised gates; the second moves what is behind them
            trainer.train_step(kind)
        assert unchanged(before, model, groups[stays] + frozen) == [], f"a {kind} step moved the {stays} group"
        still = [n for n in groups[moves] if n not in unchanged(before, model, groups[moves])]
        assert still == [], f"a {kind} step left these {moves} tensors unchanged"


@pytest.mark.parametrize("eight_bit", [False, True], ids=["float", "8bit"])
def test_frozen_base_never_changes(tmp_path, visual_base, eight_bit):
    trainer = finetune.start(write_recipe(tmp_path, visual_base, load_in_8bit=eight_bit))
    model = trainer.loaded.model
    trainable = {n for named in param_groups(model).values() for n, _ in named}
    frozen = [n for n in model.state_dict() if n not in trainable]
    if eight_bit:
        assert any(".int8." in n for n in frozen)
    before = snapshot(model)
    for kind in ("caption", "instruction", "caption", "instruction"):
        trainer.train_step(kind)
    assert unchanged(before, model, frozen) == []


# --- exact resume ----------------------------------------------------------------------------------------------


def test_kill9_then_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, steps=12, checkpoint_every=1)
    done = cli("finetune", str(recipe), "--out", str(tmp_path / "straight"))
    assert done.returncode == 0, done.stderr

    killed_at = random.Random().randint(2, 9)
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "lav2.cli", "finetune", str(recipe), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "state" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if latest.is_file() and int(latest.read_text().split("-")[1]) >= killed_at:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    resumed = cli("finetune", str(recipe), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight, again = adapter(tmp_path / "straight"), adapter(out)
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight), f"differs after a kill at step {killed_at}"
    steps = [m["step"] for m in finetune.read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 13))


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resumes(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, steps=400, checkpoint_every=0)
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "lav2.cli", "finetune", str(recipe), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(finetune.read_metrics(out)) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    saved = int((out / "state" / "latest").read_text().split("-")[1])
    assert saved >= 3 and "--resume" in err
    assert lav2.load(out).model is not None


# --- gradient checkpointing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("eight_bit", [False, True], ids=["float", "8bit"])
def test_gradient_checkpointing_keeps_only_block_inputs(eight_bit):
    """8 blocks of width 128 on 4 x 128 tokens. Without checkpointing each block keeps ~17 activations of
    B x T x C (more through the 352-wide MLP); with it, only its input. Measured: 55.5 -> 3.1 MiB float,
    66.0 -> 3.1 MiB 8-bit (non-reentrant checkpointing left 14.6 MiB in 8-bit: bitsandbytes stashes inputs)."""
    config = Config.from_name("tiny-paper", n_layers=8, dim=128, visual_len=0, visual_layers=0, adapter_layers=4)
    torch.manual_seed(0)
    model = LLaMAAdapter(config)
    for p in model.parameters():
        if not p.requires_grad:
            p.data.normal_(0, 0.02)
    if eight_bit:
        quantize_8bit_(model)
    mark_trainable(model)
    tokens = torch.randint(0, config.vocab_size, (4, 128))
    batch = Batch(tokens, tokens.clone(), None, torch.zeros(4, dtype=torch.bool))
    plain = finetune.activation_bytes(model, batch)["graph_bytes"]
    model.gradient_checkpointing = True
    kept = finetune.activation_bytes(model, batch)["graph_bytes"]
    block_inputs = config.n_layers * tokens.numel() * config.dim * 4
    assert plain / kept > 10
    assert kept < block_inputs + 1.5 * 2**20  # the inputs, plus the head's logits and loss


def test_checkpointed_and_plain_gradients_agree(tmp_path, visual_base):
    trainer = finetune.start(write_recipe(tmp_path, visual_base, micro_batch_size=4))
    model = trainer.loaded.model
    batch = trainer.micro_batches("instruction")[0]
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        hidden = model(batch.tokens, batch.images, image_mask=batch.image_mask, head=False)
        finetune.loss_sum(hidden, batch.labels, model.output).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
def test_supervised_chunked_head_gives_the_full_logits_loss_and_gradients(tmp_path, visual_base, images):
    trainer = finetune.start(write_recipe(tmp_path, visual_base, micro_batch_size=4))
    model = trainer.loaded.model
    mark_trainable(model)
    batch = trainer.micro_batches("instruction")[0]
    batch = batch if images else Batch(batch.tokens, batch.labels, None, torch.zeros_like(batch.image_mask))
    assert images == bool(batch.image_mask.any()) and (batch.labels == IGNORE_INDEX).any()

    def loss_and_grads(loss_of) -> tuple[torch.Tensor, dict]:
        model.zero_grad(set_to_none=True)
        loss = loss_of(model(batch.tokens, batch.images, image_mask=batch.image_mask, head=False))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def full(hidden):  # every position's logits, as training computed them before
        logits = model.output(hidden)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    want, want_grads = loss_and_grads(full)
    assert finetune.supervised_tokens(batch) > 7
    for chunk_rows in (finetune.HEAD_CHUNK_ROWS, 7):  # one chunk, and several
        got, got_grads = loss_and_grads(lambda h: finetune.loss_sum(h, batch.labels, model.output,
                                                                    chunk_rows=chunk_rows))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert got_grads.keys() == want_grads.keys() and len(got_grads) > 10
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-6, atol=1e-6, msg=name)


def test_training_never_makes_logits_for_every_position(tmp_path, visual_base, monkeypatch):
    trainer = finetune.start(write_recipe(tmp_path, visual_base, micro_batch_size=4, caption_ratio=0.0))
    head, rows = trainer.loaded.model.output, []
    monkeypatch.setattr(head, "forward", lambda x, forward=head.forward: rows.append(x.shape[0]) or forward(x))
    batches = trainer.micro_batches("instruction")
    trainer.positions["instruction"] = 0
    trainer.train_step("instruction")
    assert sum(rows) == 2 * sum(finetune.supervised_tokens(b) for b in batches)  # forward, and its recomputation
    assert max(rows) < min(b.tokens.numel() for b in batches)


# --- 8-bit ---------------------------------------------------------------------------------------------------


def test_8bit_base_trains_and_its_folder_loads(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, load_in_8bit=True, gradient_checkpointing=True, caption_ratio=0.0,
                          micro_batch_size=4, lr={"visual": 1e-2, "language": 3e-2}, schedule="constant")
    trainer = finetune.start(recipe)
    model, batch = trainer.loaded.model, trainer.micro_batches("instruction")[0]
    trainer.positions["instruction"] = 0

    def loss() -> float:
        with torch.no_grad():
            hidden = model(batch.tokens, batch.images, image_mask=batch.image_mask, head=False)
        return float(finetune.loss_sum(hidden, batch.labels, model.output)) / finetune.supervised_tokens(batch)

    first = loss()
    for _ in range(15):
        trainer.train_step()
    assert loss() < first - 0.25  # measured on this fixed batch: 5.75 -> 5.39
    trainer.save()
    loaded = lav2.load(tmp_path / "run")
    assert loaded.info["base"] == os.path.relpath(visual_base, tmp_path / "run")
    assert loaded.info["prompt_style"] == "alpaca" and loaded.info["source"]["step"] == 15
    tokens = torch.tensor([loaded.tokenizer.encode("What colour is the shape?")])
    assert torch.isfinite(loaded.model(tokens)).all()


# --- several processes ---------------------------------------------------------------------------------------


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, visual_base):
    """gloo on the CPU. The gradient is the global token mean either way; only the order of float32 sums
    differs, so the trainables agree to 1e-5 (absolute) after 4 steps, not bitwise."""
    recipe = write_recipe(tmp_path, visual_base, steps=4, checkpoint_every=0)
    one = cli("finetune", str(recipe), "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    for attempt in range(2):
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "lav2.cli", "finetune", str(recipe), "--out", str(tmp_path / "two")],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        # Seen about once in four runs on this 2-core machine: a rank aborts in gloo's teardown
        # ("terminate called without an active exception"); one more launch, and any other failure fails.
        if two.returncode == 0 or "terminate called without an active exception" not in two.stderr:
            break
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith(".gate"))  # it trained: gates start at zero
    losses = [[m["loss"] for m in finetune.read_metrics(tmp_path / run) if "loss" in m] for run in ("one", "two")]
    assert len(losses[0]) == 4 and all(abs(x - y) < 1e-5 for x, y in zip(*losses))


# --- faults --------------------------------------------------------------------------------------------------


def test_disk_full_on_checkpoint_keeps_the_last_good_one(tmp_path, visual_base, monkeypatch):
    recipe = write_recipe(tmp_path, visual_base, steps=4, checkpoint_every=2)
    real, calls = checkpoint.save_tensors, []

    def full_disk(state, path):
        calls.append(path)
        if len(calls) > 2:  # step 0 (adapter and rng) goes through; the step 2 checkpoint does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_tensors", full_disk)
    with pytest.raises(Lav2Error, match="No space left on device") as error:
        finetune.run(recipe)
    assert "\n" not in str(error.value) and "step-0000000" in str(error.value) and "--resume" in str(error.value)
    out = tmp_path / "run"
    assert (out / "state" / "latest").read_text().strip() == "step-0000000"
    assert [p.name for p in (out / "state").iterdir() if p.name != "latest"] == ["step-0000000"]
    monkeypatch.setattr(checkpoint, "save_tensors", real)
    finetune.run(recipe, resume=True)
    assert (out / "state" / "latest").read_text().strip() == "step-0000004"


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, visual_base, monkeypatch):
    recipe = write_recipe(tmp_path, visual_base, steps=6, checkpoint_every=1)
    real, calls = finetune.loss_sum, []

    def poisoned(hidden, labels, head):
        calls.append(1)
        loss = real(hidden, labels, head)
        return loss * float("nan") if len(calls) == 7 else loss  # the first micro-batch of step 4

    monkeypatch.setattr(finetune, "loss_sum", poisoned)
    with pytest.raises(Lav2Error, match="loss is nan") as error:
        finetune.run(recipe)
    assert "\n" not in str(error.value) and "step-0000003" in str(error.value)
    out = tmp_path / "run"
    assert (out / "state" / "latest").read_text().strip() == "step-0000003"
    assert lav2.load(out).info["source"]["step"] == 3


def test_existing_output_folder_is_never_overwritten(tmp_path, visual_base):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["finetune", str(write_recipe(tmp_path, visual_base)), "--out", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "--resume" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_base_fails_before_the_output_folder_exists(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, tmp_path / "no-such-base")
    with pytest.raises(Lav2Error, match="no-such-base"):
        finetune.run(recipe)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_asked_but_absent_is_one_line_and_leaves_the_checkpoint(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, steps=2)
    out = finetune.run(recipe)
    before = {p: p.read_bytes() for p in (out / "state").rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["finetune", str(recipe), "--resume", "--set", "train.device=cuda"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "cuda" in lines[0] and "train.device" in lines[0]
    assert {p: p.read_bytes() for p in (out / "state").rglob("*") if p.is_file()} == before


def test_resume_without_a_run_and_a_run_that_is_complete(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, steps=2)
    with pytest.raises(Lav2Error, match="no run to resume"):
        finetune.run(recipe, resume=True)
    out = finetune.run(recipe)
    before = adapter(out)
    finetune.run(recipe, resume=True)  # nothing left to do: the same weights
    assert all(torch.equal(before[k], v) for k, v in adapter(out).items())


# --- schedule, memory estimate -------------------------------------------------------------------------------


def test_step_kinds_follow_caption_ratio_and_two_phase(tmp_path, visual_base):
    from lav2.recipe import load_recipe

    joint = load_recipe(write_recipe(tmp_path, visual_base, caption_ratio=0.25))
    kinds = [finetune.step_kind(s, joint) for s in range(2000)]
    assert 0.2 < kinds.count("caption") / 2000 < 0.3
    assert kinds == [finetune.step_kind(s, joint) for s in range(2000)]
    phased = load_recipe(write_recipe(tmp_path, visual_base, phase_mode="two-phase", visual_steps=3))
    assert [finetune.step_kind(s, phased) for s in range(6)] == ["caption"] * 3 + ["instruction"] * 3


# --- the offline demo ----------------------------------------------------------------------------------------


def test_demo_recipe_runs_end_to_end(tmp_path, monkeypatch):
    # the demo is data made by `lav2 demo` plus an ordinary recipe, run from the project's root as the README does
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "shapes.yaml").write_text((ROOT / "recipes" / "shapes.yaml").read_text())
    made = CliRunner().invoke(main, ["demo", "runs/demo", "--images", "24", "--heldout", "6", "--clip-steps", "5"])
    assert made.exit_code == 0, made.output
    records = [json.loads(line) for line in (tmp_path / "runs/demo/heldout/eval.jsonl").read_text().splitlines()]
    assert len(records) == 12 and (tmp_path / "runs/demo/heldout" / records[0]["image"]).is_file()
    out = finetune.run("recipes/shapes.yaml", out=tmp_path / "shapes",
                       overrides=["train.steps=8", "train.checkpoint_every=0", "train.visual_steps=4"])
    assert (out / "loss.png").is_file()
    loaded = lav2.load(out)
    assert Path(loaded.info["base"]) == Path("../runs/demo/base") and loaded.preprocess is not None
    info = json.loads((out / "lav2.json").read_text())
    layout = yaml.safe_load((ROOT / "recipes" / "shapes.yaml").read_text())["layout"]
    assert info["layout"] == layout and info["adapter"] == "adapter.safetensors" and info["prompt_style"] == "chat"


def test_adamw8bit_trains_and_resumes(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, steps=2, optimizer="adamw8bit")
    out = finetune.run(recipe)
    finetune.run(recipe, resume=True, overrides=["train.steps=3"])
    assert (out / "state" / "latest").read_text().strip() == "step-0000003"
    assert len([m for m in finetune.read_metrics(out) if "loss" in m]) == 3


# --- write failures, leftovers of killed runs, two runs at once ----------------------------------------------


def one_line(result, *phrases) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_a_safetensors_full_disk_at_a_checkpoint_is_one_line(tmp_path, visual_base, monkeypatch):
    from safetensors import SafetensorError

    recipe = write_recipe(tmp_path, visual_base, steps=4, checkpoint_every=2)
    real, calls = checkpoint.save_file, []

    def full_disk(state, path):
        calls.append(path)
        if len(calls) > 2:  # step 0 is written; the step 2 checkpoint is not
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        real(state, path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    one_line(CliRunner().invoke(main, ["finetune", str(recipe)]), "step 2 checkpoint", "(No space left on device)",
             "step-0000000", "--resume")
    state = tmp_path / "run" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["latest", "step-0000000"]  # no .partial left


def test_a_full_disk_while_the_optimizer_state_is_written_is_one_line(tmp_path, visual_base, monkeypatch):
    recipe = write_recipe(tmp_path, visual_base, steps=4, checkpoint_every=2)
    real, calls = Path.write_bytes, []

    def full_disk(path, data):
        if path.name.startswith("optimizer-"):
            calls.append(path)
            if len(calls) > 2:  # step 0's two groups are written; step 2's are not
                path.write_text("half")  # as a full disk leaves a file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    one_line(CliRunner().invoke(main, ["finetune", str(recipe)]), "step 2 checkpoint", "(No space left on device)",
             "step-0000000", "--resume")
    state = tmp_path / "run" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["latest", "step-0000000"]  # no .partial left
    assert calls and all(not p.exists() for p in calls[2:])


def test_resume_removes_the_partial_checkpoint_of_a_killed_run(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, steps=2)
    out = finetune.run(recipe)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = out / "state" / f".step-0000003.partial-{child.pid}"
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"half")
    result = CliRunner().invoke(main, ["finetune", str(recipe), "--resume", "--set", "train.steps=3"])
    assert result.exit_code == 0, result.output
    assert "removed 1 partial folder" in result.stderr and stale.name in result.stderr
    assert sorted(p.name for p in (out / "state").iterdir()) == ["latest", "step-0000003"]


def test_a_second_run_into_a_folder_in_use_is_one_line(tmp_path, visual_base):
    import fcntl

    recipe = write_recipe(tmp_path, visual_base, steps=2)
    out = tmp_path / "run"
    with open(tmp_path / ".run.lock", "w") as held:  # what the first run holds for its life
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        for args in (["finetune", str(recipe)], ["finetune", str(recipe), "--resume"]):
            one_line(CliRunner().invoke(main, args), f"{out} is in use by another run (pid 4242)")
        assert not out.exists()
    assert finetune.run(recipe) == out  # released: the folder is free again


def test_two_runs_started_at_once_into_one_folder(tmp_path, visual_base):
    recipe = write_recipe(tmp_path, visual_base, steps=2)
    runs = [subprocess.Popen([sys.executable, "-m", "lav2.cli", "finetune", str(recipe)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 1], errors
    failed = errors[[run.returncode for run in runs].index(1)]
    lines = [line for line in failed.splitlines() if line.strip()]
    assert len(lines) == 1 and ("in use by another run" in lines[0] or "already exists" in lines[0]), failed
    assert (tmp_path / "run" / "state" / "latest").read_text().strip() == "step-0000002"


@pytest.mark.parametrize("how, phrase", [("list", "expected a JSON object, found a list"),
                                         ("adapter", "the field 'adapter' must be a string or null, not 7"),
                                         ("dim", "config.dim must be int"),
                                         ("no-config", "the field 'config' is missing"),
                                         ("no-weights", "names the weights file 'model.safetensors', which is missing")])
def test_a_malformed_base_folder_is_one_line_before_the_run_folder(tmp_path, visual_base, how, phrase):
    from test_checkpoint import damaged_copy

    base = damaged_copy(visual_base, tmp_path / "base", how)
    one_line(CliRunner().invoke(main, ["finetune", str(write_recipe(tmp_path, base))]), "recipe.yaml",
             f"{base}", "lav2.json", phrase)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.partial-*"))


@pytest.mark.parametrize("device", ["tpu:3", "cuda:7", "gpu"])
def test_a_bad_train_device_is_one_line(tmp_path, visual_base, device):
    if device == "cuda:7" and torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU")
    recipe = write_recipe(tmp_path, visual_base)
    message = one_line(CliRunner().invoke(main, ["finetune", str(recipe), "--set", f"train.device={device}"]),
                       "train.device")
    assert "cpu" in message and not (tmp_path / "run").exists()


def test_a_corrupt_training_image_is_found_before_the_run_folder(tmp_path, visual_base):
    from test_data import write_image_data

    images = write_image_data(tmp_path / "data").parent
    recipe = yaml.safe_load(write_recipe(tmp_path, visual_base).read_text())
    recipe["data"] = {"instruction": [{"path": str(images / "alpaca.json"), "format": "alpaca"}],
                      "caption": [{"path": str(images / "captions.jsonl"), "format": "captions"}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one_line(CliRunner().invoke(main, ["finetune", str(tmp_path / "recipe.yaml")]),
             "3 records have an unreadable image", "garbage.png", "train.skip_bad_records")
    assert not (tmp_path / "run").exists()
