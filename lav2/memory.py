"""What a run needs in memory against what the device has: the choice that fits, or a refusal in one line.

Estimated from the config alone (parameter counts from a model on the meta device), before anything is loaded,
so that a 7B model that cannot fit is refused in a second instead of being killed by the kernel after minutes
of swapping. Inference: weights at the chosen dtype or quantization, the KV cache, and a working margin.
Training: the frozen base (8-bit or the training dtype), the float32 trainables with their gradients and AdamW
moments, and the activations a micro-batch keeps (all of each block's, or with gradient checkpointing only the
block inputs plus one block recomputed). LAV2_MEMORY_GIB pretends the device has that much (tests, or to leave
room for other programs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lav2.errors import Lav2Error
from lav2.model import Config, LLaMAAdapter, base_parameter_names

GIB = 2**30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
HEADROOM = 1.1  # allocator slack, fragmentation, what the estimate leaves out
WORKSPACE = 0.5 * GIB  # the interpreter, torch and its kernels' scratch space


def available_bytes(device: torch.device) -> int:
    """Memory the device can give this process now: free GPU memory, or the CPU's MemAvailable."""
    if os.environ.get("LAV2_MEMORY_GIB"):
        try:
            return int(float(os.environ["LAV2_MEMORY_GIB"]) * GIB)
        except ValueError:
            raise Lav2Error(f"LAV2_MEMORY_GIB={os.environ['LAV2_MEMORY_GIB']!r} is not a number of GiB") from None
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class Counts:
    """Parameter counts a memory estimate needs, from the config alone."""

    matrices: int  # the block linears' frozen W
    embeddings: int  # token embeddings and the output head
    other: int  # norms, adapter, visual branch (kept in float)
    trainable: int

    @classmethod
    def of(cls, config: Config) -> "Counts":
        with torch.device("meta"):
            model = LLaMAAdapter(config)
        named = dict(model.named_parameters())
        base = base_parameter_names(model)
        embeddings = named["tok_embeddings.weight"].numel() + named["output.weight"].numel()
        matrices = sum(named[n].numel() for n in base) - embeddings
        other = sum(p.numel() for n, p in named.items() if n not in base)
        return cls(matrices, embeddings, other, other)


def weight_bytes(counts: Counts, dtype: torch.dtype, quantize: Optional[str], clip_params: int) -> int:
    """The model's tensors: int8 matrices take a byte per weight (plus a scale per row, ignored here)."""
    matrix = 1 if quantize else BYTES[dtype]
    head = 1 if quantize == "int8" else BYTES[dtype]  # weight-only int8 quantizes the head too
    return (counts.matrices * matrix + counts.embeddings // 2 * (BYTES[dtype] + head)
            + counts.other * BYTES[dtype] + clip_params * BYTES[dtype])


def kv_cache_bytes(config: Config, dtype: torch.dtype, batch: int = 1) -> int:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * config.max_seq_len * batch * BYTES[dtype]


def inference_bytes(config: Config, *, dtype: torch.dtype, quantize: Optional[str], clip_params: int,
                    batch: int = 1) -> int:
    counts = Counts.of(config)
    logits = config.max_seq_len * config.vocab_size * 4 * batch  # a whole prompt's float32 logits at prefill
    need = weight_bytes(counts, dtype, quantize, clip_params) + kv_cache_bytes(config, dtype, batch) + logits
    return int(need * HEADROOM) + WORKSPACE


@dataclass(frozen=True)
class Plan:
    dtype: torch.dtype
    quantize: Optional[str]
    need: int
    have: int
    note: Optional[str]  # one line for the user when the plan is not what they asked for, else None


def who_has(device: torch.device) -> str:
    """How a refusal names the memory it compared with."""
    return "the GPU has" if device.type == "cuda" else "the CPU has"


def describe(dtype: torch.dtype, quantize: Optional[str]) -> str:
    return "int8" if quantize else str(dtype).removeprefix("torch.")


def plan_inference(config: Config, device: torch.device, *, dtype: Optional[torch.dtype], quantize: Optional[str],
                   clip_params: int, default_dtype: torch.dtype) -> Plan:
    """The dtype and quantization to load with: what was asked if it fits; when nothing was asked, the default
    if it fits, else the next smaller that does (bfloat16, then int8), said in `note`; else a Lav2Error."""
    have = available_bytes(device)
    where = who_has(device)

    def need(d, q):
        return inference_bytes(config, dtype=d, quantize=q, clip_params=clip_params)

    if dtype is not None or quantize is not None:
        chosen = (dtype or default_dtype, quantize)
        if need(*chosen) > have:
            smaller = [c for c in ((torch.bfloat16, None), (default_dtype, "int8")) if need(*c) <= have]
            hint = (f"use {' or '.join(option(*c) for c in smaller)}" if smaller
                    else "free memory or use a machine with more")
            raise Lav2Error(f"not enough memory: {describe(*chosen)} needs about {need(*chosen) / GIB:.1f} GiB and "
                            f"{where} {have / GIB:.1f} GiB available; {hint}")
        return Plan(*chosen, need(*chosen), have, None)
    candidates = [(default_dtype, None)] + [c for c in ((torch.bfloat16, None), (default_dtype, "int8"))
                                            if c != (default_dtype, None)]
    for d, q in candidates:
        if need(d, q) <= have:
            note = None if (d, q) == candidates[0] else (
                f"memory: {describe(*candidates[0])} needs about {need(*candidates[0]) / GIB:.1f} GiB and {where} "
                f"{have / GIB:.1f} GiB available: loading in {describe(d, q)} ({need(d, q) / GIB:.1f} GiB); "
                f"{option(d, q)} says so explicitly")
            return Plan(d, q, need(d, q), have, note)
    smallest = candidates[-1]
    raise Lav2Error(f"not enough memory: even {describe(*smallest)} needs about {need(*smallest) / GIB:.1f} GiB and "
                    f"{where} {have / GIB:.1f} GiB available; free memory or use a machine with more")


def option(dtype: torch.dtype, quantize: Optional[str]) -> str:
    return "--quantize int8" if quantize else f"--dtype {describe(dtype, None)}"


def training_bytes(config: Config, *, dtype: torch.dtype, load_in_8bit: bool, checkpointing: bool,
                   micro_batch: int, seq_len: int, clip_params: int) -> int:
    """A training step's peak: weights, float32 trainables x4 (weights, gradients, AdamW's two moments), and the
    activations of one micro-batch (about 20 (B, T, C) tensors a block without checkpointing, its input with it,
    plus the float32 logits of the head and their gradient)."""
    counts = Counts.of(config)
    weights = weight_bytes(counts, dtype, "8bit" if load_in_8bit else None, clip_params)
    trainables = counts.trainable * 4 * 4
    tokens = micro_batch * seq_len
    block = tokens * config.dim * BYTES[dtype]
    per_block = block if checkpointing else 20 * block
    activations = config.n_layers * per_block + 20 * block + 2 * tokens * config.vocab_size * 4
    return int((weights + trainables + activations) * HEADROOM) + WORKSPACE


def check_training(config: Config, device: torch.device, *, dtype: torch.dtype, load_in_8bit: bool,
                   checkpointing: bool, micro_batch: int, seq_len: int, clip_params: int, where: str) -> int:
    """Refuse, in one line naming the settings that would fit, a training run the device cannot hold."""
    have = available_bytes(device)

    def need(eight_bit: bool, ckpt: bool) -> int:
        return training_bytes(config, dtype=dtype, load_in_8bit=eight_bit, checkpointing=ckpt,
                              micro_batch=micro_batch, seq_len=seq_len, clip_params=clip_params)

    needed = need(load_in_8bit, checkpointing)
    if needed <= have:
        return needed
    options = [f"train.load_in_8bit: {str(e).lower()}, train.gradient_checkpointing: {str(c).lower()} "
               f"({need(e, c) / GIB:.1f} GiB)" for e, c in ((False, True), (True, False), (True, True))
               if need(e, c) <= have and (e, c) != (load_in_8bit, checkpointing)]
    hint = ("set " + " or ".join(options[:1])) if options else "lower train.micro_batch_size or train.max_seq_len"
    raise Lav2Error(f"{where}: not enough memory to train: about {needed / GIB:.1f} GiB needed and {who_has(device)} "
                    f"{have / GIB:.1f} GiB available; {hint}")
