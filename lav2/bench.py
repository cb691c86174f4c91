"""`python -m lav2.bench`: measured decode speed, train-step speed and training memory, one JSON object per run.

    python -m lav2.bench decode --config mid --dtype float32 [--image] [--compile]
    python -m lav2.bench train --config small [--checkpointing] [--8bit]
    python -m lav2.bench memory-7b | chat --config 7b [--quantize int8] | import | gpu | eval | serve

Models get random weights: speed and memory do not depend on the values. Every model has the paper's layout
(bias and scale on all seven linears, gated prompts in the top layers, the visual prompt in the first layer),
sized by `--config`:  tiny (the test size), small (~0.2B, for CPU training), mid (~0.95B, CPU decode), 7b.

decode: batch-1 greedy decoding through lav2.generate's prefill/decode_one_token/sample, the model's matrices
stored as checkpoint.load stores them (store_for_decoding_). Time to first token is the prefill (with --image: the CLIP
tower and the resampler too) plus the first sample; tokens/s is the median over the decoded tokens. Alongside: the
same LLaMA without the adapter and the adapter folded into it (fold_adapters_), stepped in
turn token by token with the adapter model, so that other processes on a shared machine slow all of them alike;
and the bandwidth bound: the bytes a decode step reads divided by the rate a large matrix-vector product streams
weights at, measured between the same decode steps (BandwidthProbe, medians against medians); `read_ratio`
compares with a plain read of memory instead. --dtype int8 compares with float32 on the same tokens: greedy
agreement (the int8 model is fed the float32 model's greedy tokens) and the logit error; compiled, also against
the same int8 model with torch's int8 kernel in every product (`torch_int8_kernel`). Where the prefill runs in
bfloat16 (fastpath.prefill_dtype), `prefill` compares it with a float32 prefill of the same prompt in the same way,
with both times to first token. --compile steps every model
through generate.compiled_step, as `lav2 chat --compile` does; it compiles during the warm-up, on a KV
cache of the timed runs' length, so that no timed token recompiles (a chat keeps one cache length too).

train --length-mix alpaca: instruction steps through finetune's Trainer (Batches, collate, train_step) on an
Alpaca-like long-tailed length mix (LengthMix), with length grouping on and off, alternating step by step:
supervised tokens/s and the fraction of padding.

train: one step of the language group (forward, backward, AdamW) on random tokens, timed per phase; peak memory
is torch.cuda.max_memory_allocated on a GPU, and on the CPU the parameter bytes plus the peak of the bytes alive
at once among the tensors the step creates, tracked op by op (LiveBytes).

memory-7b: the 7B recipe (seq 512, micro-batch 4, 8-bit base, gradient checkpointing, bf16) run for real: a random
7B paper-layout folder written shard by shard, loaded as finetune loads it, a few timed steps; peak memory is the
process's peak resident memory on the CPU (VmHWM) or torch.cuda.max_memory_allocated, with the memory planner's
estimate beside it. chat: load and decode as `lav2 chat` does at real width (bfloat16, or int8 quantized as it is
read). gpu: memory-7b and both chats in one run, for a CUDA machine (it runs on the CPU too, slowly). import:
`lav2 download` of a random Hugging Face-format folder, its time and its own peak resident memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import click
import torch
import torch.nn as nn

from lav2 import checkpoint, memory
from lav2.checkpoint import DTYPES
from lav2.fastpath import Int8Head, Int8Linear, decode_storage, prefill_dtype, quantize_int8_, store_for_decoding_
from lav2.data import IGNORE_INDEX, Batches, Example, Mixture, PreparedData
from lav2.finetune import LiveBytes, Trainer, loss_sum, supervised_tokens
from lav2.generate import compiled_step, decode_one_token, prefill, sample
from lav2.checkpoint import build_clip_visual, with_layout
from lav2.model import Config, LLaMAAdapter, fold_adapters_, mark_trainable, param_groups
from lav2.recipe import Recipe, Train
from lav2.tokenizer import train_tokenizer

PAPER = Config.from_name("paper-7b")
CONFIGS = {
    "tiny": Config.from_name("tiny-paper"),
    "small": with_layout(Config(dim=1024, n_layers=8, n_heads=8, max_seq_len=1024), PAPER),
    "mid": with_layout(Config(dim=2048, n_layers=16, n_heads=16, max_seq_len=1024), PAPER),
    "7b": PAPER,
}
LAYOUTS = {"tiny": "tiny-paper", "small": "paper-7b", "mid": "paper-7b", "7b": "paper-7b"}  # what CONFIGS hold
# open_clip.CLIP kwargs: a tiny ViT for the tiny config (as the tests build), ViT-L/14 for the others
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
VIT_L_14 = {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}}
GIB = 2**30


# --- machine and models ------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    return {"device": device.type, "name": name, "threads": torch.get_num_threads(), "torch": torch.__version__}


def pick_device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def random_(name: str, t: torch.Tensor) -> torch.Tensor:
    """Random values of the right scale for the tensor called `name`: norms and scales near 1, everything else
    small (uniform: faster to draw than normal for a billion numbers, and the values do not matter for speed or
    memory)."""
    owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
    if name.endswith(".scale") or (name.endswith(".weight") and ("norm" in owner or owner.startswith("ln"))):
        return t.uniform_(0.9, 1.1)
    return t.uniform_(-0.035, 0.035)  # std 0.02


def random_tensors(shapes: dict[str, torch.Tensor], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """A random tensor for each (name, meta tensor), one at a time, drawn in float32 and stored in `dtype`."""
    for name, meta in shapes.items():
        yield name, random_(name, torch.empty(meta.shape)).to(dtype if meta.is_floating_point() else meta.dtype)


def clip_config(config: Config) -> dict:
    return TINY_CLIP if config.clip_dim == TINY_CLIP["embed_dim"] else VIT_L_14


def random_folders(config: Config, root: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Model folders with random weights: root/base (the LLaMA, with a random CLIP tower when the model has a
    visual branch) and root/model (the adapter of `config` over it). Written tensor by tensor, a shard at a time,
    so that a 7B folder never sits in memory whole; benchmarks load them as every command loads a folder."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LLaMAAdapter(config)
        clip = build_clip_visual(clip_config(config)) if config.visual_len else None
    base_names = checkpoint.base_state_names(model)
    state = model.state_dict()
    base, adapted = root / "base", root / "model"
    base.mkdir(parents=True)
    tokenizer = root / ".tokenizer.model"
    word_tokenizer(tokenizer, 300)
    clip_spec = clip_weights = None
    if clip is not None:
        clip_spec = {"config": clip_config(config), "weights": checkpoint.CLIP_FILE}
        clip_weights = dict(random_tensors(clip.state_dict(), dtype))
    checkpoint.write_folder(base, config=config.base(), layout="llama", tokenizer=tokenizer,
                            base_weights=checkpoint.shards(random_tensors(
                                {k: v for k, v in state.items() if k in base_names}, dtype)),
                            clip_spec=clip_spec, clip_weights=clip_weights, source={"bench": "random weights"})
    adapter = {k: v for k, v in state.items() if k not in base_names}
    if adapter:
        adapted.mkdir()
        checkpoint.write_folder(adapted, config=config, layout="bench", tokenizer=tokenizer, base="../base",
                                adapter=dict(random_tensors(adapter, dtype)), source={"bench": "random weights"})
    return base, adapted if adapter else base


def build_model(config: Config, *, device: torch.device, dtype: torch.dtype, layout: Optional[str] = None,
                quantize: Optional[str] = None) -> LLaMAAdapter:
    """A random model loaded by checkpoint.load (inference, or with `layout` for training), from folders
    written into a temporary directory that is gone once the model is loaded."""
    with tempfile.TemporaryDirectory(prefix="lav2-bench-") as tmp:
        base, adapted = random_folders(config, Path(tmp))
        return checkpoint.load(base if layout else adapted, device, dtype, layout=layout, quantize=quantize).model


def plain_llama(model: LLaMAAdapter) -> LLaMAAdapter:
    """The same LLaMA with no adapter: the model's base weights, laid out for decoding as the model is."""
    with torch.device("meta"):
        base = LLaMAAdapter(model.config.base())
    state = model.state_dict()
    base.load_state_dict({k: state[k].clone() for k in base.state_dict()}, assign=True)
    base.init_rope(model.tok_embeddings.weight.device)
    store_for_decoding_(base)
    return base.eval()


def count(model: nn.Module, *, trainable: Optional[bool] = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


# --- decode ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """Greedy decoding of one model after a prompt (T,) on its own KV cache, one token per `advance()`, so that
    several models can be stepped in turn and share whatever else the machine is doing at that moment.
    `forced`: feed these tokens instead of the model's own choices (teacher forcing), so that two models are
    compared at the same contexts."""

    def __init__(self, model: LLaMAAdapter, prompt: torch.Tensor, *, new_tokens: int, images=None,
                 forced: Optional[list[int]] = None, keep_logits: bool = False, step: Callable = decode_one_token,
                 fast_prefill: bool = True):
        self.model, self.step, self.forced, self.keep_logits = model, step, forced, keep_logits
        self.device = prompt.device
        model.setup_cache(1, len(prompt) + new_tokens)
        self.start = len(prompt)
        sync(self.device)
        start = time.perf_counter()
        logits = prefill(model, prompt[None], 0, images, fast=fast_prefill)[0]
        self.token = sample(logits, temperature=0)
        self.tokens = [int(self.token)]  # the host sync that generate() makes for every token
        self.first_token_s = time.perf_counter() - start
        self.token_s: list[float] = []  # one decode step and its sample, per token after the first
        self.kept = [logits.float()] if keep_logits else []  # (V,) logits per token

    def advance(self) -> None:
        i = len(self.token_s)
        fed = self.token if self.forced is None else torch.tensor([self.forced[i]], device=self.device)
        start = time.perf_counter()
        logits = self.step(self.model, fed.view(1, 1), self.start + i)[0]
        self.token = sample(logits, temperature=0)
        self.tokens.append(int(self.token))
        self.token_s.append(time.perf_counter() - start)
        if self.keep_logits:
            self.kept.append(logits.float())


class BandwidthProbe:
    """The rate this machine streams weights, measured between decode steps (so that other processes on a shared
    machine slow it and the decoders alike; medians are compared with medians). Each advance() times a
    matrix-vector product over a matrix far larger than the CPU caches, stored as a loaded model stores its
    matrices (decode_storage), and a plain sum over the same bytes: how fast memory itself can be read."""

    def __init__(self, device: torch.device, *, mib: int, cols: int = 4096):
        self.device = device
        self.weight = decode_storage(torch.empty(mib * 2**20 // (4 * cols), cols, device=device).uniform_())
        self.x = torch.randn(1, cols, device=device)
        self.matvec_s: list[float] = []
        self.read_s: list[float] = []
        self.advance()  # warm-up, not kept
        self.matvec_s.clear()
        self.read_s.clear()

    def _time(self, fn: Callable) -> float:
        sync(self.device)
        start = time.perf_counter()
        fn()
        sync(self.device)
        return time.perf_counter() - start

    def advance(self) -> None:
        self.matvec_s.append(self._time(lambda: torch.nn.functional.linear(self.x, self.weight)))
        self.read_s.append(self._time(self.weight.sum))

    def gb_s(self) -> dict[str, float]:
        return {"matvec": self.weight.nbytes / statistics.median(self.matvec_s) / 1e9,
                "read": self.weight.nbytes / statistics.median(self.read_s) / 1e9}


def decode_in_turn(decoders: list[Decoder], new_tokens: int, probe: Optional[BandwidthProbe] = None) -> None:
    """Advance every decoder token by token, in turn, and the probe after each token; then free their caches."""
    for _ in range(new_tokens - 1):
        for decoder in decoders:
            decoder.advance()
        if probe is not None:
            probe.advance()
    for decoder in decoders:
        decoder.model.clear_cache()


def decode_bytes(model: LLaMAAdapter, context: int, *, image: bool) -> dict[str, int]:
    """Bytes one decode step reads at `context` cached positions: every block matrix (float or quantized) with
    its bias/scale, the norms, the output head, one embedding row, the cached keys/values of the context and of
    the prompts. Not read: the other embedding rows, the visual branch, the learned prompt tokens (their
    keys/values are cached)."""
    skip = ("tok_embeddings.", "visual.", "adapter_query", "freqs_cis")
    named = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
             if not n.startswith(skip) and ".kv_cache." not in n]
    weights = sum(t.nbytes for n, t in named
                  if (n.endswith((".weight", ".weight_int8")) and t.ndim == 2) or n.endswith(".scales"))
    extras = sum(t.nbytes for n, t in named) - weights  # biases, bias-tuning scales, norms, gates
    c = model.config
    elem = model.tok_embeddings.weight.element_size()
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * context * elem
    prompt_lens = {"adapter": c.adapter_len, "visual": c.visual_len if image else 0}
    prompt_kv = sum(2 * c.n_kv_heads * c.head_dim * prompt_lens[kind] * elem for kind in c.prompt_layers().values())
    return {"weights": weights, "adapter_extras": extras, "embedding_row": c.dim * elem, "kv_cache": kv,
            "prompt_kv": prompt_kv}


def logit_agreement(reference: "Decoder", other: "Decoder") -> dict:
    same = [a == b for a, b in zip(reference.tokens, other.tokens)]
    ref_logits = torch.stack(reference.kept)
    error = (torch.stack(other.kept) - ref_logits).abs()
    return {"greedy_agreement": sum(same) / len(same),
            "first_disagreement": same.index(False) if False in same else None,
            "max_logit_error": float(error.max()), "mean_logit_error": float(error.mean()),
            "logit_std": float(ref_logits.std())}


def compare_prefill(model: LLaMAAdapter, prompt: torch.Tensor, fast_ttft: float, *, images, new_tokens: int,
                    rounds: int, step: Callable) -> dict:
    """The default prefill (fastpath.prefill_dtype) against a prefill as stored (float32): time to first token,
    the first token's logit error, and the greedy agreement of the answers (the fast one fed the stored one's
    tokens, as --dtype int8 compares)."""
    stored = []
    for _ in range(rounds):
        stored.append(Decoder(model, prompt, new_tokens=new_tokens, images=images, keep_logits=True, step=step,
                              fast_prefill=False))
        decode_in_turn(stored[-1:], new_tokens if len(stored) == 1 else 1)
    fast_logits = Decoder(model, prompt, new_tokens=new_tokens, images=images, keep_logits=True, step=step,
                          forced=stored[0].tokens)
    decode_in_turn([fast_logits], new_tokens)
    agreement = logit_agreement(stored[0], fast_logits)
    first_error = (fast_logits.kept[0] - stored[0].kept[0]).abs()
    ttft = {"fast": fast_ttft, "stored": min(d.first_token_s for d in stored)}  # fast: the headline's figure
    return {"dtype": str(prefill_dtype(model)).removeprefix("torch."), "time_to_first_token_s": ttft,
            "speedup": ttft["stored"] / ttft["fast"], "first_token_max_logit_error": float(first_error.max()),
            "first_token_logit_std": float(stored[0].kept[0].std()),
            "greedy_agreement": agreement["greedy_agreement"], "first_disagreement": agreement["first_disagreement"]}


def bench_decode(*, config_name: str, dtype: str, image: bool, compile: bool, prompt_tokens: int,
                 new_tokens: int, rounds: int, device: Optional[str], compare: bool, bandwidth_mib: int) -> dict:
    """Decode speed of one config and dtype; see the module docstring."""
    dev = pick_device(device)
    config = replace(CONFIGS[config_name], max_seq_len=max(CONFIGS[config_name].max_seq_len,
                                                           prompt_tokens + new_tokens))
    int8 = dtype == "int8"
    model = build_model(config, device=dev, dtype=torch.float32 if int8 else DTYPES[dtype])
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (prompt_tokens,), generator=generator).to(dev)
    images = None
    if image:
        size = clip_config(config)["vision_cfg"]["image_size"]
        images = torch.randn(1, 3, size, size, generator=generator).to(dev, model.tok_embeddings.weight.dtype)

    variants = {"adapter": model}
    if int8:
        variants = {"float32": model, "adapter": quantize_int8_(copy.deepcopy(model))}
        if compile and compare:  # the same int8 model with torch's int8 kernel in every product
            variants["torch_int8_kernel"] = quantize_int8_(copy.deepcopy(model))
            for module in variants["torch_int8_kernel"].modules():
                if isinstance(module, (Int8Linear, Int8Head)):
                    module.fused_rows = False
    elif compare:
        variants["base"] = plain_llama(model)
        variants["merged"] = copy.deepcopy(model)
        fold_adapters_(variants["merged"])
        store_for_decoding_(variants["merged"])
    steps = {name: compiled_step(m) if compile else decode_one_token for name, m in variants.items()}
    decoders: dict[str, list[Decoder]] = {name: [] for name in variants}
    probe = BandwidthProbe(dev, mib=bandwidth_mib)
    for name, m in variants.items():  # warm-up (and compilation), with the timed runs' cache length, as a chat
        decode_in_turn([Decoder(m, prompt, new_tokens=new_tokens, images=images, step=steps[name])],
                       min(4, new_tokens))
    for _ in range(rounds):
        turn: dict[str, Decoder] = {}
        for name, m in variants.items():  # int8 is fed float32's tokens as they come (float32 steps first)
            forced = turn["float32"].tokens if int8 and name != "float32" else None
            turn[name] = Decoder(m, prompt, new_tokens=new_tokens, images=images, step=steps[name], keep_logits=int8,
                                 forced=forced)
        decode_in_turn(list(turn.values()), new_tokens, probe)
        for name, decoder in turn.items():
            decoders[name].append(decoder)
    per_token_ms = {name: 1e3 * statistics.median(t for d in ds for t in d.token_s) for name, ds in decoders.items()}
    result: dict = {"benchmark": "decode", "config": config_name, "dtype": dtype, "image": image,
                    "compile": compile, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds,
                    "params": count(model) - (count(model.visual.clip) if image else 0)}
    if int8:
        result.update(logit_agreement(decoders["float32"][0], decoders["adapter"][0]))
        result["speedup_vs_float32"] = per_token_ms["float32"] / per_token_ms["adapter"]
    if "torch_int8_kernel" in variants:
        result["torch_int8_kernel"] = {**logit_agreement(decoders["float32"][0], decoders["torch_int8_kernel"][0]),
                                       "fused_row_speedup": per_token_ms["torch_int8_kernel"] / per_token_ms["adapter"]}
    if prefill_dtype(variants["adapter"]) is not None:
        fast_ttft = min(d.first_token_s for d in decoders["adapter"])
        result["prefill"] = compare_prefill(variants["adapter"], prompt, fast_ttft, images=images,
                                            new_tokens=new_tokens, rounds=rounds, step=steps["adapter"])
    if "base" in per_token_ms:
        result["adapter_overhead"] = per_token_ms["adapter"] / per_token_ms["base"] - 1
        result["merged_overhead"] = per_token_ms["merged"] / per_token_ms["base"] - 1
    bytes_read = decode_bytes(variants["adapter"], prompt_tokens + new_tokens // 2, image=image)
    bandwidth = probe.gb_s()
    total = sum(bytes_read.values())
    achieved = 1e3 / per_token_ms["adapter"]
    result.update({
        "time_to_first_token_s": min(d.first_token_s for d in decoders["adapter"]), "tokens_per_s": achieved,
        "per_token_ms": per_token_ms, "bytes_per_token": total, "bytes_breakdown": bytes_read,
        "bandwidth_gb_s": bandwidth["matvec"], "bound_tokens_per_s": bandwidth["matvec"] * 1e9 / total,
        "achieved_tokens_per_s": achieved, "ratio": achieved * total / (bandwidth["matvec"] * 1e9),
        "read_gb_s": bandwidth["read"], "read_ratio": achieved * total / (bandwidth["read"] * 1e9),
        "machine": machine(dev)})
    return result


# --- memory tracking ---------------------------------------------------------------------------------------


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (quantized layers' int8 data and scales included)."""
    return sum(t.nbytes for t in module.state_dict().values() if isinstance(t, torch.Tensor))


# --- train -------------------------------------------------------------------------------------------------


@dataclass
class StepTimes:
    forward: float
    backward: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.optimizer


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_step(model: LLaMAAdapter, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
               dtype: torch.dtype) -> StepTimes:
    """One instruction step: forward with the loss, backward, AdamW step; seconds of each phase."""
    device = tokens.device
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, dtype):
        loss = loss_sum(model(tokens, head=False), tokens, model.output) / tokens.numel()
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return StepTimes(t1 - t0, t2 - t1, time.perf_counter() - t2)


def train_model(config_name: str, *, device: torch.device, load_in_8bit: bool, checkpointing: bool):
    """The paper layout loaded for fine-tuning as finetune loads it, the language group trainable (an
    instruction step), and its AdamW."""
    model = build_model(CONFIGS[config_name], device=device, dtype=torch.float32, layout=LAYOUTS[config_name],
                        quantize="8bit" if load_in_8bit else None).train()
    mark_trainable(model, ("language",))
    model.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW([p for _, p in param_groups(model)["language"]], lr=1e-4)
    return model, optimizer


def bench_train(*, config_name: str, seq_len: int, batch_size: int, steps: int, checkpointing: bool,
                load_in_8bit: bool, precision: str, device: Optional[str]) -> dict:
    """Train-step speed and peak memory; see the module docstring."""
    dev = pick_device(device)
    dtype = DTYPES[precision]
    config = CONFIGS[config_name]
    model, optimizer = train_model(config_name, device=dev, load_in_8bit=load_in_8bit, checkpointing=checkpointing)
    tokens = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(dev)
    weights = tensor_bytes(model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        train_step(model, optimizer, tokens, dtype)
        peak, method = torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated over the first step"
    else:
        with LiveBytes() as live:  # the first step: it also creates the AdamW state
            train_step(model, optimizer, tokens, dtype)
        peak, method = weights + live.peak, ("parameter and buffer bytes + peak bytes alive at once among the "
                                             "tensors the first step creates, tracked op by op (LiveBytes)")
    times = [train_step(model, optimizer, tokens, dtype) for _ in range(steps)]
    best = min(times, key=lambda t: t.total)
    return {
        "benchmark": "train", "config": config_name, "layout": "paper", "seq_len": seq_len,
        "batch_size": batch_size, "steps": steps, "gradient_checkpointing": checkpointing,
        "load_in_8bit": load_in_8bit, "precision": precision,
        "tokens_per_s": tokens.numel() / best.total, "step_s": best.total,
        "forward_s": best.forward, "backward_s": best.backward, "optimizer_s": best.optimizer,
        "share": {k: getattr(best, k) / best.total for k in ("forward", "backward", "optimizer")},
        "trainable_params": count(model, trainable=True), "frozen_params": count(model, trainable=False),
        "peak_memory_bytes": peak, "peak_memory_gib": peak / GIB, "memory_method": method, "machine": machine(dev)}


class LengthMix:
    """A seeded stand-in for an instruction file of Alpaca's shape: record lengths log-normal (median `median`
    tokens, clipped to [16, max_len]), each a prompt part (unsupervised) and a response part (supervised, about
    60% of it), as SourceDataset hands them out. Random token ids: speed does not depend on them."""

    def __init__(self, records: int, *, vocab_size: int, median: int = 150, max_len: int = 512, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.lengths_ = torch.empty(records).log_normal_(math.log(median), 0.7, generator=generator)
        self.lengths_ = self.lengths_.round().clamp(16, max_len).int().tolist()
        self.prompts = [max(4, round(n * float(u))) for n, u in zip(self.lengths_, torch.rand(records, generator=generator)
                                                                    * 0.3 + 0.25)]
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return len(self.lengths_)

    def __getitem__(self, i: int) -> Example:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        tokens = torch.randint(3, self.vocab_size, (self.lengths_[i],), generator=generator).tolist()
        labels = [IGNORE_INDEX] * self.prompts[i] + tokens[self.prompts[i]:]
        return Example(tokens, labels, None, f"record {i}")

    def lengths(self) -> list[int]:
        return self.lengths_


def bench_length_mix(*, config_name: str, micro_batch_size: int, steps: int, records: int,
                     device: Optional[str]) -> dict:
    """Supervised tokens/s of instruction steps on an Alpaca-like length mix, through finetune's Trainer (Batches,
    collate, train_step: float32, AdamW), with length grouping on and off, the settings alternating step by step
    so that other processes on a shared machine slow both alike."""
    dev = pick_device(device)
    config = CONFIGS[config_name]
    mix = Mixture([LengthMix(records, vocab_size=config.vocab_size, max_len=min(512, config.max_seq_len))], [1.0])
    with tempfile.TemporaryDirectory(prefix="lav2-bench-") as tmp:
        folder, _ = random_folders(config, Path(tmp))
        loaded = checkpoint.load(folder, dev, torch.float32, layout=LAYOUTS[config_name])
        trainers = {}
        for group in (True, False):
            recipe = Recipe(base=str(folder), layout=LAYOUTS[config_name], path=Path(tmp) / "recipe.yaml",
                            train=Train(steps=steps + 1, micro_batch_size=micro_batch_size,
                                        global_batch_size=micro_batch_size, precision="float32", caption_ratio=0.0,
                                        max_seq_len=config.max_seq_len, group_by_length=group))
            trainers[group] = Trainer(recipe, Path(tmp) / "run", loaded, PreparedData(mix, None, [], 0, 0, None, False),
                                      dev.type)
        totals = {group: {"seconds": 0.0, "supervised": 0, "tokens": 0, "padding": 0} for group in trainers}
        for step in range(steps + 1):  # the first step of each is a warm-up (it also creates the AdamW state)
            for group, trainer in trainers.items():
                batch = next(Batches(mix, micro_batch_size, seed=0, pad_id=0, start=trainer.positions["instruction"],
                                     group_by_length=group))  # the batch this step reads, to count its tokens
                seconds = trainer.train_step("instruction").seconds
                if step:
                    t = totals[group]
                    t["seconds"] += seconds
                    t["supervised"] += supervised_tokens(batch)
                    t["tokens"] += batch.tokens.numel()
                    t["padding"] += int((batch.tokens == 0).sum())  # record token ids are >= 3
    result: dict = {"benchmark": "train", "config": config_name, "length_mix": "alpaca", "records": records,
                    "median_length": statistics.median(mix.lengths()), "max_length": max(mix.lengths()),
                    "micro_batch_size": micro_batch_size, "steps": steps, "precision": "float32"}
    for group, t in totals.items():
        result["grouped" if group else "shuffled"] = {
            "supervised_tokens_per_s": t["supervised"] / t["seconds"], "tokens_per_s": t["tokens"] / t["seconds"],
            "padding_fraction": t["padding"] / t["tokens"], "step_s": t["seconds"] / steps}
    result["speedup_grouped"] = (result["grouped"]["supervised_tokens_per_s"]
                                 / result["shuffled"]["supervised_tokens_per_s"])
    result["machine"] = machine(dev)
    return result


# --- memory-7b, chat, gpu: the real size -------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM)."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(device: torch.device) -> None:
    """Start counting the peak from here (Linux: /proc/self/clear_refs "5"; CUDA: the allocator's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then includes what came before


def peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return peak_rss_bytes(), "peak resident memory of the process (VmHWM)"


def bench_memory_7b(*, config_name: str, seq_len: int, micro_batch_size: int, steps: int,
                    device: Optional[str]) -> dict:
    """The 7B fine-tuning recipe for real: the paper-layout model loaded as finetune loads it (random bfloat16
    base, 8-bit, gradient checkpointing, bf16 autocast), `steps` instruction steps at micro_batch_size x seq_len,
    measured peak memory and time per step; the planner's estimate beside it as a cross-check."""
    dev = pick_device(device)
    config = CONFIGS[config_name]
    recipe = {"config": config_name, "seq_len": seq_len, "micro_batch_size": micro_batch_size,
              "load_in_8bit": True, "gradient_checkpointing": True, "precision": "bfloat16"}
    with tempfile.TemporaryDirectory(prefix="lav2-bench-") as tmp:
        start = time.perf_counter()
        base, _ = random_folders(config, Path(tmp), dtype=torch.bfloat16)
        write_s = time.perf_counter() - start
        reset_peak(dev)
        start = time.perf_counter()
        model = checkpoint.load(base, dev, torch.bfloat16, layout=LAYOUTS[config_name], quantize="8bit").model
        load_s = time.perf_counter() - start
    load_peak, method = peak_bytes(dev)
    model.train()
    mark_trainable(model, ("language",))
    model.gradient_checkpointing = True
    optimizer = torch.optim.AdamW([p for _, p in param_groups(model)["language"]], lr=1e-4)
    tokens = torch.randint(3, config.vocab_size, (micro_batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    times = [train_step(model, optimizer, tokens.to(dev), torch.bfloat16) for _ in range(steps)]
    peak, method = peak_bytes(dev)
    estimate = memory.training_bytes(config, dtype=torch.bfloat16, load_in_8bit=True, checkpointing=True,
                                     micro_batch=micro_batch_size, seq_len=seq_len,
                                     clip_params=checkpoint.clip_params({"config": clip_config(config)}))
    return {"benchmark": "memory-7b", "estimate": False, **recipe, "steps": steps,
            "peak_memory_bytes": peak, "peak_memory_gib": peak / GIB, "load_peak_gib": load_peak / GIB,
            "memory_method": method, "step_s": [t.total for t in times], "load_s": load_s, "write_folder_s": write_s,
            "planner_estimate_gib": estimate / GIB, "trainable_params": count(model, trainable=True),
            "machine": machine(dev)}


def bench_chat(*, config_name: str, dtype: str, quantize: Optional[str], prompt_tokens: int, new_tokens: int,
               device: Optional[str], folder: Optional[Path] = None) -> dict:
    """A chat-sized run at real width: the model loaded as `lav2 chat` loads it (from a random bfloat16 folder,
    in `dtype` or quantized as it is read), a prompt prefilled, `new_tokens` greedy tokens; peak memory of the
    load and the decoding, time to first token, tokens/s."""
    dev = pick_device(device)
    config = CONFIGS[config_name]
    with contextlib.ExitStack() as stack:
        if folder is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lav2-bench-")))
            folder = random_folders(config, tmp, dtype=torch.bfloat16)[1]
        reset_peak(dev)
        start = time.perf_counter()
        model = checkpoint.load(folder, dev, DTYPES[dtype], quantize=quantize).model
        load_s = time.perf_counter() - start
    prompt = torch.randint(3, config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).to(dev)
    decoder = Decoder(model, prompt, new_tokens=new_tokens)
    decode_in_turn([decoder], new_tokens)
    peak, method = peak_bytes(dev)
    return {"benchmark": "chat", "config": config_name, "dtype": dtype, "quantize": quantize,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "load_s": load_s,
            "time_to_first_token_s": decoder.first_token_s,
            "tokens_per_s": 1 / statistics.median(decoder.token_s) if decoder.token_s else None,
            "peak_memory_bytes": peak, "peak_memory_gib": peak / GIB, "memory_method": method,
            "machine": machine(dev)}


def hf_folders(config: Config, root: Path, *, dtype: torch.dtype = torch.float16,
               shard_bytes: int = 5 * 10**9) -> tuple[Path, Path]:
    """What a user downloads: a Hugging Face LLaMA folder (config.json, model-0000N-of-0000M.safetensors in HF's
    names, tokenizer.model) and an open_clip CLIP folder (ViT-L/14-shaped beside the big configs), random
    weights, written shard by shard."""
    inverse = {ours: hf for hf, ours in checkpoint.HF_KEYS.items()}
    inverse.update({f"layers.{i}.{ours}.weight": f"model.layers.{i}.{hf}.weight"
                    for i in range(config.n_layers) for hf, ours in checkpoint.HF_LAYER_KEYS.items()})
    model = checkpoint.meta_model(config.base())
    state = {inverse[k]: v for k, v in model.state_dict().items() if k in checkpoint.base_state_names(model)}
    hf, clip_dir = root / "hf", root / "clip"
    hf.mkdir(parents=True)
    groups = list(checkpoint.shards(((k, v) for k, v in state.items()), max_bytes=shard_bytes // dtype.itemsize * 4))
    for i, group in enumerate(groups, 1):
        checkpoint.save_tensors(dict(random_tensors(group, dtype)), hf / f"model-{i:05d}-of-{len(groups):05d}.safetensors")
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads or config.n_heads, "intermediate_size": model.layers[0].feed_forward.w1.weight.shape[0],
        "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len, "torch_dtype": str(dtype).removeprefix("torch.")}))
    word_tokenizer(hf / checkpoint.TOKENIZER_FILE, 300)
    clip_dir.mkdir()
    import open_clip

    # the CLIP's output as wide as an imported plain LLaMA expects (the official CLIP's); both towers in
    # float32, as the hub's open_clip_model.safetensors holds them
    spec = {**clip_config(config), "embed_dim": VIT_L_14["embed_dim"]}
    with torch.device("meta"):
        clip = open_clip.CLIP(**spec)
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": spec}))
    checkpoint.save_tensors(dict(random_tensors(clip.state_dict(), torch.float32)),
                            clip_dir / "open_clip_model.safetensors")
    return hf, clip_dir


# `lav2 download` in a process of its own that reports its own peak: the kernel's ru_maxrss for a child would
# count the benchmark's memory too (exec after vfork keeps the parent's high-water mark).
IMPORT_CHILD = ("import atexit, sys\n"
                "def peak():\n"
                "    lines = open('/proc/self/status').read().splitlines()\n"
                "    print('VmHWM', *[l.split()[1] for l in lines if l.startswith('VmHWM:')], file=sys.stderr)\n"
                "atexit.register(peak)\n"
                "from lav2.cli import main\n"
                "main()\n")


def bench_import(*, config_name: str) -> dict:
    """`lav2 download HF_FOLDER --clip CLIP_FOLDER --out DIR` on random Hugging Face-format weights (float16, in
    5 GB shards as transformers saves them), run as its own process: its time and peak resident memory, which
    streaming keeps near one output shard (twice: safetensors serialises a copy) however big the model is."""
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        raise click.ClickException("bench import reads the peak memory from /proc: Linux only")
    config = CONFIGS[config_name]
    with tempfile.TemporaryDirectory(prefix="lav2-bench-") as tmp:
        start = time.perf_counter()
        hf, clip_dir = hf_folders(config, Path(tmp))
        write_s = time.perf_counter() - start
        source_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", IMPORT_CHILD, "download", str(hf), "--clip", str(clip_dir),
                              "--out", str(Path(tmp) / "base")], capture_output=True, text=True)
        import_s = time.perf_counter() - start
        if run.returncode != 0:
            raise click.ClickException(f"lav2 download failed: {run.stderr.strip().splitlines()[-2:]}")
        written = sum(f.stat().st_size for f in (Path(tmp) / "base").iterdir())
    peak = int(run.stderr.split("VmHWM")[-1].split()[0]) * 1024
    return {"benchmark": "import", "config": config_name, "source_bytes": source_bytes, "written_bytes": written,
            "import_s": import_s, "write_source_s": write_s, "peak_memory_bytes": peak, "peak_memory_gib": peak / GIB,
            "memory_method": "peak resident memory of the `lav2 download` process (its VmHWM)",
            "machine": machine(torch.device("cpu"))}


def bench_gpu(*, config_name: str, steps: int, new_tokens: int, device: Optional[str]) -> dict:
    """What the README's GPU rows need, in one run: the 7B fine-tune with the 24 GB recipe (seq 512 x
    micro-batch 4, 8-bit base, checkpointing, bf16) and the 7B chat in bfloat16 and in int8."""
    seq_len = min(512, CONFIGS[config_name].max_seq_len)  # the recipe's; a test-sized model has fewer positions
    results = {"train": bench_memory_7b(config_name=config_name, seq_len=seq_len, micro_batch_size=4, steps=steps,
                                        device=device)}
    with tempfile.TemporaryDirectory(prefix="lav2-bench-") as tmp:
        folder = random_folders(CONFIGS[config_name], Path(tmp), dtype=torch.bfloat16)[1]
        for name, quantize in (("chat_bfloat16", None), ("chat_int8", "int8")):
            results[name] = bench_chat(config_name=config_name, dtype="bfloat16", quantize=quantize, prompt_tokens=32,
                                       new_tokens=new_tokens, device=device, folder=folder)
    return {"benchmark": "gpu", "config": config_name, **results}


# --- command line ------------------------------------------------------------------------------------------


def emit(result: dict, table: bool) -> None:
    """One JSON object on stdout, or with --table a readable table (nested keys joined with dots)."""
    if not table:
        click.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    out = Table(title=f"lav2 bench {result['benchmark']}", show_header=False)
    for key, value in flatten(result):
        out.add_row(key, f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int)
                    and not isinstance(value, bool) else str(value))
    Console().print(out)


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in d.items():
        rows += flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]
    return rows


table_option = click.option("--table", is_flag=True, help="Print a readable table instead of JSON.")
device_option = click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")


@click.group()
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
def main(threads):
    """Measured speed and memory of lav2, one JSON object per run."""
    if threads:
        torch.set_num_threads(threads)


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="mid", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default="float32",
              show_default=True, help="int8: weight-only int8 matrices, compared with float32 on the same tokens.")
@click.option("--image/--no-image", default=False, help="Prefill with an image (random CLIP tower).")
@click.option("--compile", is_flag=True, help="torch.compile the decode step.")
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--rounds", default=2, show_default=True,
              help="Timed runs; in each, the variants are stepped token by token in turn.")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="Also time the plain LLaMA and the folded adapter (float dtypes).")
@click.option("--bandwidth-mib", default=256, show_default=True,
              help="Size of the matrix whose matrix-vector product (and sum) measures the bandwidth.")
@device_option
@table_option
def decode(config_name, dtype, image, compile, prompt_tokens, new_tokens, rounds, compare, bandwidth_mib, device,
           table):
    """Batch-1 decode tokens/s, time to first token, and the bandwidth bound."""
    emit(bench_decode(config_name=config_name, dtype=dtype, image=image, compile=compile, prompt_tokens=prompt_tokens,
                      new_tokens=new_tokens, rounds=rounds, device=device, compare=compare,
                      bandwidth_mib=bandwidth_mib), table)


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="small", show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--batch-size", default=1, show_default=True)
@click.option("--steps", default=3, show_default=True, help="Timed steps after the first (best is reported).")
@click.option("--checkpointing/--no-checkpointing", default=False, show_default=True)
@click.option("--8bit", "load_in_8bit", is_flag=True, help="bitsandbytes 8-bit frozen matrices.")
@click.option("--precision", type=click.Choice(list(DTYPES)), default="float32", show_default=True)
@click.option("--length-mix", type=click.Choice(["alpaca"]), default=None,
              help="Instruction steps on an Alpaca-like length mix through finetune's Trainer (micro-batch: "
                   "--batch-size), length grouping on and off: supervised tokens/s and padding.")
@click.option("--records", default=2000, show_default=True, help="Records in the --length-mix data.")
@device_option
@table_option
def train(config_name, seq_len, batch_size, steps, checkpointing, load_in_8bit, precision, length_mix, records,
          device, table):
    """Tokens/s of a full train step of the paper layout, its phases, and peak memory."""
    if length_mix:
        emit(bench_length_mix(config_name=config_name, micro_batch_size=batch_size, steps=steps, records=records,
                              device=device), table)
        return
    emit(bench_train(config_name=config_name, seq_len=seq_len, batch_size=batch_size, steps=steps,
                     checkpointing=checkpointing, load_in_8bit=load_in_8bit, precision=precision, device=device),
         table)


@main.command("memory-7b")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="7b", show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--micro-batch-size", default=4, show_default=True)
@click.option("--steps", default=2, show_default=True, help="Training steps to run and time.")
@device_option
@table_option
def memory_7b(config_name, seq_len, micro_batch_size, steps, device, table):
    """Peak memory and step time of the 7B recipe (8-bit base, checkpointing, bf16), measured."""
    emit(bench_memory_7b(config_name=config_name, seq_len=seq_len, micro_batch_size=micro_batch_size, steps=steps,
                         device=device), table)


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="7b", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bfloat16", show_default=True)
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="int8 frozen matrices, quantized as read.")
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--new-tokens", default=16, show_default=True)
@device_option
@table_option
def chat(config_name, dtype, quantize, prompt_tokens, new_tokens, device, table):
    """Load and decode as `lav2 chat` does, at real width: peak memory, first token, tokens/s."""
    emit(bench_chat(config_name=config_name, dtype=dtype, quantize=quantize, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, device=device), table)


@main.command("import")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="7b", show_default=True)
@table_option
def import_(config_name, table):
    """Time and peak memory of importing a Hugging Face LLaMA folder (`lav2 download FOLDER --clip DIR`)."""
    emit(bench_import(config_name=config_name), table)


@main.command()
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="7b", show_default=True)
@click.option("--steps", default=3, show_default=True, help="Training steps of the 24 GB recipe.")
@click.option("--new-tokens", default=64, show_default=True, help="Tokens each chat decodes.")
@device_option
@table_option
def gpu(config_name, steps, new_tokens, device, table):
    """The GPU figures in one run: 7B fine-tune with the 24 GB recipe, 7B chat in bfloat16 and int8."""
    emit(bench_gpu(config_name=config_name, steps=steps, new_tokens=new_tokens, device=device), table)


# --- eval ----------------------------------------------------------------------------------------------------


def bench_eval(*, config_name: str, items: int, batch_sizes: list[int], new_tokens: int, device: Optional[str],
               with_images: bool = True) -> dict:
    """Items/s of greedy answers to questions (generate.answer_batch, as `lav2 eval` runs them) at each batch
    size, on a random model: every answer is `new_tokens` long (random weights rarely say eos early). With
    images, each item's CLIP pass costs the same at any batch size; without, only the decoding is measured."""
    from PIL import Image

    from lav2.generate import Sampling, answer_batch
    from lav2.prompts import Turn

    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="lav2-bench-") as tmp:
        loaded = checkpoint.load(random_folders(CONFIGS[config_name], Path(tmp))[1], dev)
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy())
              for _ in range(items)]
    dialogs = [[Turn(f"What colour is shape number {i}?")] for i in range(items)]
    sampling = Sampling(temperature=0, max_new_tokens=new_tokens)
    if not with_images:
        images = [None] * items
    answer_batch(loaded, dialogs[:1], images=images[:1], sampling=sampling)  # warm-up
    result: dict = {"benchmark": "eval", "config": config_name, "items": items, "new_tokens": new_tokens,
                    "images": with_images, "items_per_s": {}, "seconds": {}}
    for size in batch_sizes:
        sync(dev)
        start = time.perf_counter()
        for i in range(0, items, size):
            answer_batch(loaded, dialogs[i:i + size], images=images[i:i + size], sampling=sampling)
        sync(dev)
        seconds = time.perf_counter() - start
        result["seconds"][str(size)] = seconds
        result["items_per_s"][str(size)] = items / seconds
    first, last = (str(s) for s in (batch_sizes[0], batch_sizes[-1]))
    result["speedup"] = result["items_per_s"][last] / result["items_per_s"][first]
    result["machine"] = machine(dev)
    return result


@main.command("eval")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="small", show_default=True)
@click.option("--items", default=16, show_default=True, help="Questions, each with its own image.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma-separated batch sizes to time.")
@click.option("--new-tokens", default=16, show_default=True, help="Tokens per answer.")
@click.option("--images/--no-images", default=True, show_default=True, help="Each question with its own image.")
@device_option
@table_option
def eval_command(config_name, items, batch_sizes, new_tokens, images, device, table):
    """Items/s of batched greedy answering (lav2 eval's decoding) at several batch sizes."""
    emit(bench_eval(config_name=config_name, items=items, batch_sizes=[int(s) for s in batch_sizes.split(",")],
                    new_tokens=new_tokens, device=device, with_images=images), table)


# --- serve: the HTTP API under concurrent clients --------------------------------------------------------


def word_tokenizer(path: Path, vocab_size: int) -> None:
    """Write a tokenizer whose pieces are mostly whole pseudo-words: with one of mostly byte pieces a random
    model's bytes decode to U+FFFD, which streaming holds back to the end of the answer, so the time to the
    first token would be the time to the last."""
    import itertools
    import random

    words = ["".join(w) for w in itertools.product(["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi"], repeat=3)]
    random.Random(0).shuffle(words)
    train_tokenizer([" ".join(words[i:i + 12]) for i in range(0, len(words), 12)] * 10, path, vocab_size=vocab_size)


def stream_one(url: str, body: dict) -> tuple[float, float, int]:
    """POST a streaming chat completion; (seconds to the first content delta, total seconds, completion tokens)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:500]!r}")
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: "):])
            if first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    finally:
        conn.close()
    total = time.perf_counter() - start
    return (total if first is None else first), total, tokens


def drive_clients(url: str, *, clients: int, requests: int, body: dict) -> dict:
    """`clients` threads send `requests` streaming requests in all, each client one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda _: stream_one(url, body), range(requests)))
    seconds = time.perf_counter() - start
    tokens = sum(d[2] for d in done)
    return {"requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
            "completion_tokens": tokens, "completion_tokens_per_s": tokens / seconds,
            "time_to_first_token_s_median": statistics.median(d[0] for d in done),
            "request_s_median": statistics.median(d[1] for d in done)}


def bench_serve(*, config_name: str, clients: list[int], requests: int, max_tokens: int, max_batch: int,
                device: Optional[str]) -> dict:
    """Requests/s, completion tokens/s and the median time to first token of `lav2 serve` (in process, on
    127.0.0.1) at each number of concurrent streaming clients; greedy answers of up to max_tokens."""
    from lav2.serve import create_app, serving

    dev = pick_device(device)
    config = replace(CONFIGS[config_name], visual_len=0, visual_layers=0)
    body = {"messages": [{"role": "user", "content": "Describe a red circle next to a blue square."}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = checkpoint.load(random_folders(config, Path(tmp))[1], device=dev)
        with serving(create_app(loaded, max_batch=max_batch, max_queue=max(clients))) as url:
            stream_one(url, body)  # warm-up
            figures = {str(n): drive_clients(url, clients=n, requests=requests, body=body) for n in clients}
    return {"benchmark": "serve", "config": config_name, "params": count(loaded.model), "max_batch": max_batch,
            "max_tokens": max_tokens, "prompt_tokens": len(loaded.tokenizer.encode(body["messages"][0]["content"])),
            "clients": figures, "machine": machine(dev)}


def client_counts(ctx, param, value: str) -> list[int]:
    try:
        counts = [int(n) for n in value.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter("a comma-separated list of client counts, such as 1,8")
    return counts


@main.command("serve")
@click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default="small", show_default=True)
@click.option("--clients", default="1,8", show_default=True, callback=client_counts,
              help="Concurrent streaming clients, one measurement per count.")
@click.option("--requests", default=16, show_default=True, help="Requests per measurement.")
@click.option("--max-tokens", default=32, show_default=True, help="Answer length asked for (greedy).")
@click.option("--max-batch", default=8, show_default=True, help="The server's --max-batch.")
@device_option
@table_option
def serve_command(config_name, clients, requests, max_tokens, max_batch, device, table):
    """Throughput and time to first token of `lav2 serve` at 1 and at several concurrent clients."""
    emit(bench_serve(config_name=config_name, clients=clients, requests=requests, max_tokens=max_tokens,
                     max_batch=max_batch, device=device), table)


if __name__ == "__main__":
    main()
