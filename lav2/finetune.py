"""`lav2 finetune RECIPE.yaml`: the training loop of LLaMA-Adapter V2.

One optimizer step is either a caption step, which updates only the visual group, or an instruction step,
which updates only the language group (DESIGN.md §1.4). Each group has its own AdamW, and only the group of
the step is stepped: AdamW's weight decay and momentum would move a parameter even with a zero gradient.

The output folder is a lav2 model folder from the first step on (lav2.json with "base" pointing to the base
folder, adapter.safetensors, tokenizer.model), plus the run's own files:

    run.json             the recipe and overrides the run was started with
    state/latest         the name of the last complete checkpoint, replaced atomically
    state/step-NNNNNNN/  adapter.safetensors, optimizer-{visual,language}.pt, rng.safetensors, trainer.json
    metrics.jsonl        one line per step, and evaluations
    loss.png             the loss curve

A checkpoint is written into a hidden partial folder and renamed into place, so a crash, a full disk or
kill -9 leaves the previous one intact; `--resume` continues from `state/latest` with the same batches, the
same optimizer state and the same random state, so the result is bitwise that of an uninterrupted run.

Several processes (torchrun) split every global batch between them and all-reduce the gradients of the
trainable tensors only; the frozen base is never synchronised.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lav2 import checkpoint, memory
from lav2.data import IGNORE_INDEX, Batch, PreparedData, prepare
from lav2.download import lav2_home
from lav2.errors import Lav2Error
from lav2.model import LLaMAAdapter, adapter_state_dict, count_params, mark_trainable, param_groups
from lav2.recipe import Recipe, check_data_files, load_recipe

RUN_FILE, STATE_DIR, LATEST, METRICS_FILE, LOSS_PLOT = "run.json", "state", "latest", "metrics.jsonl", "loss.png"
GROUP_OF = {"caption": "visual", "instruction": "language"}
BETAS = (0.9, 0.95)  # the official LLaMA-Adapter training scripts


# --- processes and devices ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(wanted: str, where: str) -> str:
    """"cuda" or "cpu" for train.device auto/cpu/cuda; asking for a GPU that is not there is an error."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise Lav2Error(f"{where}: train.device is cuda but no CUDA GPU is visible to torch; set train.device: cpu "
                        f"(or auto), or check the driver and CUDA_VISIBLE_DEVICES")
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


# --- the model ---------------------------------------------------------------------------------------------


def resolve_base(base: str, where: str) -> Path:
    """A model folder path as it is, a registry name under $LAV2_HOME (made by `lav2 download NAME`)."""
    path = Path(base)
    if path.is_absolute():
        if not path.is_dir():
            raise Lav2Error(f"{where}: base {path} is not a folder; give a lav2 model folder made by `lav2 download`")
        return path
    home = lav2_home()
    if not (home / base).is_dir():
        raise Lav2Error(f"{where}: base {base!r} is not downloaded ({home / base} is missing); run "
                        f"`lav2 download {base}` first, or give a model folder path")
    return home / base


def check_inputs_exist(recipe: Recipe) -> None:
    """One message for everything absent: the data files and the base model, each with where to get it."""
    problems = []
    for check in (lambda: check_data_files(recipe), lambda: resolve_base(recipe.base, str(recipe.path))):
        try:
            check()
        except Lav2Error as e:
            problems.append(str(e).removeprefix(f"{recipe.path.name}: ").removeprefix(f"{recipe.path}: "))
    if problems:
        raise Lav2Error(f"{recipe.path.name}: " + "; ".join(problems))


def build_model(recipe: Recipe, device: str) -> checkpoint.Loaded:
    """The recipe's base LLaMA (frozen, in the training precision) with the recipe's layout on top, adapters
    initialised from train.seed, CLIP attached, float32 trainables."""
    t = recipe.train
    base_dir = resolve_base(recipe.base, str(recipe.path))
    dtype = checkpoint.DTYPES[t.precision]
    try:
        info, config = checkpoint.model_config(base_dir, layout=recipe.layout)
    except Lav2Error as e:
        raise Lav2Error(f"{recipe.path}: {e}") from None
    clip = checkpoint.effective_clip(base_dir, info) or checkpoint.DEFAULT_CLIP
    memory.check_training(config, checkpoint.pick_device(device), dtype=dtype, load_in_8bit=t.load_in_8bit,
                          checkpointing=t.gradient_checkpointing, micro_batch=t.micro_batch_size,
                          seq_len=t.max_seq_len, clip_params=checkpoint.clip_params(clip) if config.visual_len else 0,
                          where=str(recipe.path))
    try:
        loaded = checkpoint.load(base_dir, device, dtype, layout=recipe.layout, seed=t.seed,
                                 quantize="8bit" if t.load_in_8bit else None)
    except Lav2Error as e:
        raise Lav2Error(f"{recipe.path}: {e}") from None
    if t.max_seq_len > loaded.config.max_seq_len:
        raise Lav2Error(f"{recipe.path}: train.max_seq_len {t.max_seq_len} exceeds the base's "
                        f"{loaded.config.max_seq_len} positions; lower it")
    return loaded


def trainable_params(model: LLaMAAdapter) -> list[tuple[str, torch.nn.Parameter]]:
    groups = param_groups(model)
    return groups["visual"] + groups["language"]


def adapter_tensors(model: LLaMAAdapter) -> dict[str, torch.Tensor]:
    """What the adapter file holds, on the CPU."""
    return {k: v.detach().cpu() for k, v in adapter_state_dict(model).items()}


# --- optimizers and schedule -------------------------------------------------------------------------------


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Gates, norms, biases and scales keep their values without decay (timm's rule, as the release)."""
    return p.ndim <= 1 or name.endswith((".gate", ".new_gate", ".bias", ".scale"))


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.train
    decay = [p for n, p in named if t.decay_on_gates_norms or not no_decay(n, p)]
    keep = [p for n, p in named if not t.decay_on_gates_norms and no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay}, {"params": keep, "weight_decay": 0.0})
              if g["params"]]
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise Lav2Error("train.optimizer adamw8bit needs bitsandbytes: pip install 'lav2[8bit]'") from None
        return bnb.optim.AdamW8bit(groups, lr=0.0, betas=BETAS)
    return torch.optim.AdamW(groups, lr=0.0, betas=BETAS)


def lr_factor(step: int, total: int, recipe: Recipe) -> float:
    """Linear warmup over warmup_steps, then the schedule down to min_lr (as a fraction of the peak)."""
    return schedule_factor(step, total, warmup=recipe.train.warmup_steps, schedule=recipe.train.schedule)


def schedule_factor(step: int, total: int, *, warmup: int, schedule: str = "cosine") -> float:
    """The learning rate at `step` of `total` as a fraction of the peak: linear warmup over `warmup` steps, then
    constant, linear or cosine down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def group_lr(group: str, step: int, total: int, recipe: Recipe) -> float:
    peak = getattr(recipe.train.lr, group)
    floor = min(recipe.train.min_lr, peak)
    return floor + (peak - floor) * lr_factor(step, total, recipe)


def step_kind(step: int, recipe: Recipe) -> str:
    """"caption" or "instruction" for this step: a pure function of (seed, step), so resuming needs no state."""
    t = recipe.train
    if t.phase_mode == "two-phase":
        return "caption" if step < t.visual_steps else "instruction"
    return "caption" if random.Random(f"{t.seed}/kind/{step}").random() < t.caption_ratio else "instruction"


def total_steps(recipe: Recipe, data: PreparedData) -> int:
    t = recipe.train
    if t.steps is not None:
        return t.steps
    examples = sum(m.epoch_len for m in (data.instruction, data.caption) if m is not None)
    return max(1, math.ceil(t.epochs * examples / t.global_batch_size))


# --- loss --------------------------------------------------------------------------------------------------


HEAD_CHUNK_ROWS = 2048  # positions per chunk of the output head: 2048 x 32000 float32 logits are 250 MiB


def loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, *,
             chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of next-token prediction in float32: the hidden state (B, T, C) at t (the model's
    forward with head=False) predicts labels at t + 1. The head runs on the supervised positions only, in chunks
    whose logits the backward recomputes (checkpoint) instead of keeping: the (B, T, V) logits never exist."""
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1)
    rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]  # (N, C), (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(1, len(rows)), chunk_rows):  # one (empty) chunk at least: the loss stays in the graph
        chunk = slice(start, start + chunk_rows)
        total = total + torch.utils.checkpoint.checkpoint(_head_loss, head, rows[chunk], targets[chunk],
                                                          use_reentrant=False)
    return total


def _head_loss(head: torch.nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def supervised_tokens(batch: Batch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


# --- the trainer -------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    step: int
    kind: str
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


@dataclass
class Trainer:
    recipe: Recipe
    out: Path
    loaded: checkpoint.Loaded  # the model being trained, from build_model
    data: PreparedData
    device: str
    dist: Dist = field(default_factory=Dist)
    step: int = 0
    total: int = 0
    positions: dict[str, int] = field(default_factory=lambda: {"instruction": 0, "caption": 0})
    lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)  # run_lock, by start

    def __post_init__(self):
        t = self.recipe.train
        model = self.loaded.model
        model.gradient_checkpointing = t.gradient_checkpointing
        self.params = param_groups(model)
        self.optimizers = {g: make_optimizer(named, self.recipe) for g, named in self.params.items() if named}
        per_step = t.micro_batch_size * self.dist.world
        if t.global_batch_size % per_step:
            raise Lav2Error(f"{self.recipe.path}: train.global_batch_size {t.global_batch_size} is not a multiple of "
                            f"micro_batch_size x processes ({t.micro_batch_size} x {self.dist.world})")
        self.accumulation = t.global_batch_size // per_step
        self.batches = {kind: self.data.batches(kind, t.micro_batch_size, seed=t.seed,
                                                group_by_length=t.group_by_length and kind == "instruction")
                        for kind in ("instruction", "caption") if getattr(self.data, kind) is not None}
        self.dtype = checkpoint.DTYPES[t.precision]
        self.scaler = torch.amp.GradScaler(self.device) if t.precision == "float16" else None
        self.total = self.total or total_steps(self.recipe, self.data)

    # One optimizer step ---------------------------------------------------------------------------------

    def micro_batches(self, kind: str) -> list[Batch]:
        """This process's share of the global batch at the current data position of `kind`."""
        if kind not in self.batches:
            raise Lav2Error(f"{self.recipe.path}: step {self.step} is a {kind} step but the recipe has no {kind} "
                            f"data; add data.{kind} or set train.caption_ratio")
        it, start, m = self.batches[kind], self.positions[kind], self.recipe.train.micro_batch_size
        micro = []
        for a in range(self.accumulation):
            it.position = start + (a * self.dist.world + self.dist.rank) * m
            micro.append(next(it))
        self.positions[kind] = start + self.recipe.train.global_batch_size
        return micro

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (on this process's device: NCCL reduces GPU tensors only); returns the sum."""
        if self.dist.world == 1:
            return tensor
        on_device = tensor.to(self.device)
        torch.distributed.all_reduce(on_device)
        return on_device.to(tensor.device)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype)

    def train_step(self, kind: Optional[str] = None) -> StepResult:
        """One optimizer step of `kind` (default: what the schedule gives); raises Lav2Error on a non-finite loss."""
        start = time.perf_counter()
        kind = kind or step_kind(self.step, self.recipe)
        group = GROUP_OF[kind]
        if group not in self.optimizers:
            raise Lav2Error(f"{self.recipe.path}: layout {self.recipe.layout} has no {group} parameters but step "
                            f"{self.step} is a {kind} step; set train.caption_ratio to "
                            f"{0 if kind == 'caption' else 1}")
        model, named = self.loaded.model, self.params[group]
        mark_trainable(model, (group,))  # the other group gets no gradient, so no work and no way to move
        model.train()
        micro = [b.to(self.device) for b in self.micro_batches(kind)]
        # Normalise by the supervised tokens of the whole global batch, so that any split over processes and
        # accumulation steps gives the same gradient.
        count = self.all_reduce(torch.tensor(float(sum(supervised_tokens(b) for b in micro))))
        total_loss = torch.zeros((), dtype=torch.float64)
        for batch in micro:
            with self.autocast():
                hidden = model(batch.tokens, batch.images, image_mask=batch.image_mask, head=False)
                loss = loss_sum(hidden, batch.labels, model.output) / count.clamp(min=1).to(hidden.device)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total_loss += loss.detach().double().cpu()
        params = [p for _, p in named]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.dist.world > 1:
            flat = self.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
            for p, g in zip(params, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p)
        loss_value = float(self.all_reduce(total_loss))
        optimizer = self.optimizers[group]
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, self.recipe.train.grad_clip or float("inf"))
        if not math.isfinite(loss_value) or (not self.scaler and not torch.isfinite(norm)):
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {float(norm)}"
            raise Lav2Error(f"step {self.step + 1}: the {kind} {what}; stopped without saving it. The last good "
                            f"checkpoint ({self.last_saved_step()}) is intact in {self.out}; lower train.lr or check "
                            f"the data, then run again with --resume")
        lr = group_lr(group, self.step, self.total, self.recipe)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = self.all_reduce(torch.tensor(sum(b.tokens.numel() for b in micro)))
        return StepResult(self.step, kind, loss_value, lr, float(norm), int(tokens), time.perf_counter() - start)

    # Checkpoints ----------------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.out / STATE_DIR

    def last_saved_step(self) -> str:
        latest = self.state_dir / LATEST
        return latest.read_text().strip() if latest.is_file() else "none"

    def save(self) -> None:
        """Write a complete checkpoint of the current step, then make it the latest and the model folder's."""
        if not self.dist.main:
            return
        name = f"step-{self.step:07d}"
        self.state_dir.mkdir(exist_ok=True)
        partial = self.state_dir / f".{name}.partial-{os.getpid()}"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            self.write_state(partial)
            final = self.state_dir / name
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            checkpoint.write_text_atomic(self.state_dir / LATEST, name + "\n")
            publish(final, self.out)
        except (OSError, checkpoint.WriteError) as e:
            shutil.rmtree(partial, ignore_errors=True)
            reason = e.reason if isinstance(e, checkpoint.WriteError) else checkpoint.write_reason(e)
            raise Lav2Error(f"could not write the step {self.step} checkpoint in {self.state_dir} ({reason}); the last "
                            f"good checkpoint ({self.last_saved_step()}) is intact: free space, then run again with "
                            f"--resume") from None
        for old in self.state_dir.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def write_state(self, folder: Path) -> None:
        loaded = self.loaded
        # A base that names no CLIP was trained with the default one: the run folder says so.
        clip_spec = checkpoint.DEFAULT_CLIP if loaded.clip_spec is None and loaded.config.visual_len else None
        checkpoint.write_folder(folder, config=loaded.config, layout=self.recipe.layout,
                                tokenizer=loaded.folder / checkpoint.TOKENIZER_FILE,
                                base=os.path.relpath(loaded.folder, self.out), adapter=adapter_tensors(loaded.model),
                                clip_spec=clip_spec, prompt_style=self.recipe.prompt_style,
                                source=dict(recipe=str(self.recipe.path), step=self.step))
        for group, optimizer in self.optimizers.items():
            checkpoint.save_torch(optimizer.state_dict(), folder / f"optimizer-{group}.pt")
        if self.scaler:
            checkpoint.save_torch(self.scaler.state_dict(), folder / "scaler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
        checkpoint.save_tensors(rng, folder / "rng.safetensors")
        version, internal, gauss = random.getstate()
        trainer = dict(step=self.step, total=self.total, positions=self.positions,
                       python_random=[version, list(internal), gauss])
        (folder / "trainer.json").write_text(json.dumps(trainer) + "\n")

    def load(self) -> None:
        """Continue from state/latest: trainables, optimizers, RNG, data positions and step."""
        name = self.last_saved_step()
        folder = self.state_dir / name
        if name == "none" or not folder.is_dir():
            raise Lav2Error(f"{self.out}: has no complete checkpoint to resume from (state/{LATEST} is missing); "
                            f"remove the folder and start again")
        adapter = checkpoint.read_safetensors(folder / checkpoint.ADAPTER_FILE)
        params = adapter_state_dict(self.loaded.model)
        checkpoint.check_state(adapter, params, f"checkpoint {folder}")
        with torch.no_grad():
            for key, tensor in adapter.items():  # into the float32 trainables, whatever the file's dtype
                params[key].copy_(tensor)
        for group, optimizer in self.optimizers.items():
            optimizer.load_state_dict(torch.load(folder / f"optimizer-{group}.pt", map_location=self.device,
                                                 weights_only=True))
        if self.scaler:
            self.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        rng = checkpoint.read_safetensors(folder / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and "cuda0" in rng:
            torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count())
                                          if f"cuda{i}" in rng])
        trainer = json.loads((folder / "trainer.json").read_text())
        version, internal, gauss = trainer["python_random"]
        random.setstate((version, tuple(internal), gauss))
        self.step, self.positions = trainer["step"], trainer["positions"]
        if self.recipe.train.steps is None:
            self.total = trainer["total"]  # an epoch count fixed the length when the run started
        publish(folder, self.out)  # a crash may have come between a checkpoint and its publication


def publish(state: Path, out: Path) -> None:
    """Make a checkpoint's model files the output folder's, each replaced atomically (hard links: no copy)."""
    for name in (checkpoint.CONFIG_FILE, checkpoint.ADAPTER_FILE, checkpoint.TOKENIZER_FILE):
        tmp = out / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(state / name, tmp)
        except OSError:
            shutil.copyfile(state / name, tmp)
        os.replace(tmp, out / name)


# --- Ctrl-C ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """A first Ctrl-C only sets a flag, read between steps (so a step is never half applied); a second one
    interrupts at once."""
    hits = []

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling there
        yield lambda: False
        return
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


# --- metrics, plot, progress -------------------------------------------------------------------------------


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(out: Path, step: int) -> None:
    """Drop the lines of steps after the checkpoint a resumed run continues from (they will be redone)."""
    kept = [m for m in read_metrics(out) if m.get("step", 0) <= step and "eval" not in m]
    checkpoint.write_text_atomic(out / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_loss(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in read_metrics(out) if "loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in ("caption", "instruction"):
        points = [(m["step"], m["loss"]) for m in metrics if m["kind"] == kind]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, ".", markersize=2, alpha=0.3)
            window = max(1, len(losses) // 50)
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, label=f"{kind} (moving mean of {window})", color=ax.lines[-1].get_color())
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=out.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f".{LOSS_PLOT}.tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out / f".{LOSS_PLOT}.tmp.png", out / LOSS_PLOT)


def progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)


def step_info(r: StepResult, device: str) -> str:
    info = f"{r.kind[:4]} loss {r.loss:.3f} lr {r.lr:.2e} {r.tokens / r.seconds:,.0f} tok/s"
    if device == "cuda":
        info += f" {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return info


# --- the run -----------------------------------------------------------------------------------------------


def check_run_folder(out: Path, *, resume: bool) -> None:
    """A resumed run needs its folder; a fresh one must not overwrite anything."""
    if resume and not (out / RUN_FILE).is_file():
        raise Lav2Error(f"{out}: no run to resume there (no {RUN_FILE}); drop --resume to start one")
    if not resume and out.exists():
        raise Lav2Error(f"{out} already exists; continue that run with --resume, or choose another --out")


@contextlib.contextmanager
def run_lock(out: Path, dist: Dist) -> Iterator[None]:
    """Hold an exclusive lock on `.OUT.lock` beside the output folder for the run's life (main process only), so
    that a second run into the same folder stops with one line instead of racing the first. The empty lock file
    stays: removing it would let a third run lock a fresh file while the second still holds the old one."""
    if not dist.main:
        yield
        return
    lock = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as e:
        raise Lav2Error(f"cannot create the lock file {lock} ({checkpoint.write_reason(e)}); choose another --out "
                        f"or fix the permissions") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise Lav2Error(f"{out} is in use by another run (pid {owner}); wait for it to finish or choose another "
                            f"--out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield  # closing the file releases the lock


def create_run_folder(recipe: Recipe, out: Path, *, overrides: list[str], dist: Dist) -> None:
    """Create `out` atomically, with the run's own file."""
    dist.barrier()  # every process has checked `out` before the main one creates it
    if dist.main:
        with checkpoint.atomic_folder(out) as tmp:
            run = dict(recipe=str(recipe.path), overrides=overrides, started=time.strftime("%Y-%m-%d %H:%M:%S"))
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    dist.barrier()


def run(recipe_path, *, overrides: list[str] = (), out: Optional[Path] = None, resume: bool = False) -> Path:
    """Fine-tune as the recipe says; writes (or with resume continues) the model folder `out` (default: the
    recipe's output). Returns the folder."""
    trainer = start(recipe_path, overrides=overrides, out=out, resume=resume)
    with trainer.lock:
        train(trainer)
    if trainer.dist.world > 1:
        torch.distributed.destroy_process_group()
    return trainer.out


def start(recipe_path, *, overrides: list[str] = (), out: Optional[Path] = None, resume: bool = False) -> Trainer:
    """Everything before the first step: the recipe, the output folder's lock, the run folder, the model, the
    data, the checkpoint. The lock stays held until trainer.lock is closed, or released at once on an error."""
    overrides = list(overrides)
    recipe = load_recipe(recipe_path, overrides)
    out = Path(out).resolve() if out else Path(recipe.output)
    device = pick_device(recipe.train.device, str(recipe.path))
    dist = init_distributed(device)
    if device == "cuda":
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    with contextlib.ExitStack() as stack:  # on an error before the end, the lock goes at once
        stack.enter_context(run_lock(out, dist))
        check_run_folder(out, resume=resume)
        if resume and dist.main:
            checkpoint.remove_stale_partials(out / STATE_DIR, ".step-*.partial-*")
        check_inputs_exist(recipe)
        # Bad input fails here, before a new run folder exists.
        loaded = build_model(recipe, device)
        data = prepare(recipe, loaded.tokenizer, loaded.preprocess)
        if not resume:
            create_run_folder(recipe, out, overrides=overrides, dist=dist)
        trainer = Trainer(recipe, out, loaded, data, device, dist)
        if dist.world > 1:  # the same start everywhere, whatever each process's init did
            for _, p in trainable_params(loaded.model):
                torch.distributed.broadcast(p.data, 0)
        if dist.main:
            for line in data.messages():
                print(line, file=sys.stderr)
        if resume and (out / STATE_DIR / LATEST).is_file():
            trainer.load()
            if dist.main:
                truncate_metrics(out, trainer.step)
        elif dist.main:
            (out / METRICS_FILE).unlink(missing_ok=True)
            trainer.save()  # step 0: there is always a last good checkpoint
        trainer.lock = stack.pop_all()  # success: the lock now lives with the trainer
    return trainer


def train(trainer: Trainer) -> None:
    """Steps until the total, checkpoints every train.checkpoint_every steps and at the end; Ctrl-C saves."""
    every, out, main = trainer.recipe.train.checkpoint_every, trainer.out, trainer.dist.main
    started, tokens, first = time.perf_counter(), 0, trainer.step
    with deferred_interrupt() as interrupted, progress_bar(main) as bar:
        task = bar.add_task("train", total=trainer.total, completed=trainer.step, info="")
        while trainer.step < trainer.total:
            result = trainer.train_step()
            tokens += result.tokens
            if main:
                append_metrics(out, dict(step=result.step, kind=result.kind, loss=result.loss, lr=result.lr,
                                         grad_norm=result.grad_norm, tokens=result.tokens,
                                         tokens_per_s=result.tokens / result.seconds))
                bar.update(task, completed=trainer.step, info=step_info(result, trainer.device))
            stop = interrupted()
            if trainer.dist.world > 1:
                stop = bool(trainer.all_reduce(torch.tensor(int(stop))).item())
            if stop or (every and trainer.step % every == 0) or trainer.step == trainer.total:
                trainer.save()
                if main:
                    plot_loss(out)
            if stop:
                if main:
                    print(f"interrupted: saved step {trainer.step} in {out}; continue with "
                          f"`lav2 finetune {trainer.recipe.path} --out {out} --resume`", file=sys.stderr)
                raise KeyboardInterrupt
    if main:
        print_summary(trainer, time.perf_counter() - started, tokens, trainer.step - first)


def print_summary(trainer: Trainer, seconds: float, tokens: int, steps: int) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = [m for m in read_metrics(trainer.out) if "loss" in m]
    table = Table(title=f"finetune: {trainer.recipe.path.name}", show_header=False)
    table.add_row("output", str(trainer.out))
    table.add_row("steps", f"{trainer.step} ({steps} in this session, {seconds:.0f} s, "
                           f"{tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    for kind in ("caption", "instruction"):
        losses = [m["loss"] for m in metrics if m["kind"] == kind]
        if losses:
            last = losses[-max(1, len(losses) // 10):]
            table.add_row(f"{kind} loss", f"first {losses[0]:.3f}, last 10% mean {sum(last) / len(last):.3f} "
                                          f"({len(losses)} steps)")
    counts = count_params(checkpoint.meta_model(trainer.loaded.config))
    table.add_row("trainable", f"visual {counts['visual']:,}, language {counts['language']:,} "
                               f"(base {counts['base']:,} frozen)")
    table.add_row("chat", f"lav2 chat --model {trainer.out}")
    Console(stderr=True).print(table)


# --- memory: what a step keeps alive, measured op by op ---------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Bytes alive at once among the tensors created inside the block, op by op: `now` and `peak`.

    The CPU has no torch.cuda.max_memory_allocated; this sees every op's outputs (forward, the backward the
    block runs, checkpoint recomputation, optimizer state), so it counts what autograd saves and what an op
    returns, but not memory private to a kernel nor allocator slack. Tensors that existed before the block
    (the weights) are not counted: add them.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # new storages only: views and in-place results share an input's
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {p: (ref, n) for p, (ref, n) in self.live.items() if not ref.expired()}
        self.now = sum(n for _, n in self.live.values())
        self.peak = max(self.peak, self.now)
        return out

    def alive_bytes(self) -> int:
        """Bytes of the tracked storages still alive now (some may have died since the last op)."""
        return sum(n for ref, n in self.live.values() if not ref.expired())


@contextlib.contextmanager
def track_graph_memory() -> Iterator[dict]:
    """Bytes that a forward leaves alive for the backward, two ways (filled in when the block exits):

    "graph_bytes": every storage created inside the block and still alive at its end (LiveBytes), so tensors
    kept by checkpoint frames or stashed on a custom Function's ctx count too;
    "saved_tensors_bytes": what autograd's save_for_backward hands to saved_tensors_hooks, which misses both.
    Hold only the loss when the block ends (drop logits and other outputs you do not want counted).
    """
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    result: dict = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), LiveBytes() as live:
        yield result
    result["graph_bytes"] = live.alive_bytes()
    result["saved_tensors_bytes"] = sum(saved.values())


def activation_bytes(model: LLaMAAdapter, batch: Batch, *, dtype: torch.dtype = torch.float32) -> dict:
    """What one training forward of `batch` keeps for its backward (see track_graph_memory); model.train()."""
    model.train()
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(batch.tokens.device.type, dtype)
    with track_graph_memory() as measured:
        with autocast:
            hidden = model(batch.tokens, batch.images, image_mask=batch.image_mask, head=False)
            loss = loss_sum(hidden, batch.labels, model.output)
    loss.backward()  # also checks that the measured graph is a working one
    model.zero_grad(set_to_none=True)
    return measured
