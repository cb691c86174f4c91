"""How the frozen matrices are stored and multiplied for speed or memory, applied to a built model at load time.

model.py computes every frozen product as `AdapterLinear.frozen(x)` = W x and attends through `Attention.attend`.
This module swaps those, as gpt-fast's quantize.py swaps linears, so that the method's forward never knows:

- `store_for_decoding_`: CPU float32 matrices stored (in, out)-contiguous on 2 MiB pages, the order and page size
  in which a matrix-vector product (a decode step) streams them fastest; values and state dict keys unchanged;
- `quantize_int8_`: weight-only int8 with a scale per row (CPU decoding: a quarter of the bytes to stream; a
  compiled decode step multiplies by it in a fused loop, `fused_int8_row`);
- `quantize_8bit_`: bitsandbytes LLM.int8 (the 8-bit base of training, and int8 chat on CUDA);
- `prefill_dtype`: the dtype a prompt's prefill runs faster in (bfloat16 autocast on CPUs with bfloat16 matmuls);
- `compiled_decode_step`: torch.compile of one decode step, attending with a single-query kernel that inductor
  fuses into loops reading the KV cache once.

Each swapped linear is a subclass of AdapterLinear that owns its quantized W and takes over the float linear's
bias, scale and LoRA parameters (the same tensors): nothing is copied twice, nothing needs checking at run time.
Quantize after the float weights are loaded: a bitsandbytes 8-bit layer quantizes when moved with .to().
"""

from __future__ import annotations

import functools
import logging
import mmap
from typing import Callable, Optional

import torch
import torch.nn as nn

from lav2.errors import Lav2Error
from lav2.model import EXTRAS, AdapterLinear, LLaMAAdapter, attention

# --- storage -----------------------------------------------------------------------------------------------


def empty_on_huge_pages(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised (rows, cols) CPU tensor in a memory mapping of its own that asks Linux for 2 MiB pages
    (madvise MADV_HUGEPAGE; transparent huge pages are opt-in on most systems): a streamed matrix on 4 KiB pages
    misses the TLB every 4 KiB. Plain torch.empty where the platform has no such advice."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(rows, cols, dtype=dtype)
    memory = mmap.mmap(-1, rows * cols * dtype.itemsize, flags=mmap.MAP_PRIVATE)  # unmapped with its last view
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages: the mapping works without them
        pass
    return torch.frombuffer(memory, dtype=dtype).view(rows, cols)


def decode_storage(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) weight with the same shape and values, stored the way a CPU matrix-vector product streams it
    fastest: float32 (in, out)-contiguous on huge pages (MKL's kernel for x @ W reads a contiguous W faster than
    PyTorch's usual (out, in) storage). Other dtypes and devices are returned as they are."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return weight
    stored = empty_on_huge_pages(weight.shape[1], weight.shape[0])
    stored.copy_(weight.t())
    return stored.t()


@torch.no_grad()
def store_for_decoding_(model: LLaMAAdapter) -> LLaMAAdapter:
    """Store every float block matrix and the output head in decode_storage, in place (each old copy is freed
    as its replacement is made, so the model never exists twice)."""
    for module in model.modules():
        if type(module) is AdapterLinear or module is model.output and isinstance(module, nn.Linear):
            module.weight.data = decode_storage(module.weight.data)
    return model


# --- quantized linears -------------------------------------------------------------------------------------


def quantize_loaded_(model: LLaMAAdapter, key: str, kind: str) -> bool:
    """Quantize ("int8" or "8bit") the block linear whose W the state dict key `key` names, right after that W
    was loaded (and, for int8, the output head): the checkpoint loader calls it tensor by tensor. Whether it
    quantized something."""
    prefix, _, name = key.rpartition(".")
    if name != "weight":
        return False
    module = model.get_submodule(prefix)
    if type(module) is AdapterLinear:
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, (Int8Linear if kind == "int8" else Linear8bit)(module))
        return True
    if prefix == "output" and kind == "int8" and isinstance(module, nn.Linear):
        model.output = Int8Head(module)
        return True
    return False


def quantize_(model: LLaMAAdapter, kind: str) -> LLaMAAdapter:
    """Quantize every frozen matrix of a loaded model (see quantize_loaded_)."""
    for key in [k for k in model.state_dict() if k.endswith(".weight")]:
        quantize_loaded_(model, key, kind)
    return model


class QuantizedLinear(AdapterLinear):
    """An AdapterLinear whose W is stored quantized: built from a float one, whose extras it takes over."""

    def __init__(self, linear: AdapterLinear):
        out_features, in_features = linear.weight.shape
        with torch.device("meta"):  # the float W is not needed: the subclass stores its own
            super().__init__(in_features, out_features, bias=False, scale=False, lora_rank=0)
        del self.weight
        for name in EXTRAS:
            setattr(self, name, getattr(linear, name))
        self.shape = (out_features, in_features)

    def fold_(self, *, lora: bool = True) -> None:
        raise Lav2Error("cannot fold into a quantized weight: merge the float model, then quantize")

    def extra_repr(self) -> str:
        return f"{self.shape[1]} -> {self.shape[0]}, {type(self).__name__}"


@torch.library.custom_op("lav2::int8_weight_mm", mutates_args=())
def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torch's int8-weight kernel as an opaque op: torch.compile's inductor fails to lower it after a fused cast
    (torch 2.14), and calls it as it is this way. The kernel crashes on inputs that are not 64-byte aligned, as
    tensors read from a safetensors file can be: those are copied first."""
    if x.data_ptr() % 64:
        x = x.clone()
    return torch._weight_int8pack_mm(x, weight, scales)


@int8_weight_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W ~ scales[:, None] * W_int8, one scale per output row; on the CPU the int8 rows go on huge pages."""
    scales = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    quantized = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    if weight.device.type == "cpu":
        quantized = empty_on_huge_pages(*quantized.shape, dtype=torch.int8).copy_(quantized)
    return quantized, scales.to(weight.dtype)


# The widest input for which a one-row product of a compiled decode step uses the fused loop below: its float32
# row (16 KiB) then stays in the L1 cache while the int8 rows stream past; wider (w2 at `mid`) it measured four
# times slower than torch's kernel (docs/performance.md).
FUSED_MAX_IN = 4096


def fused_int8_row(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (1, in) against W_int8 (out, in): a product and a sum over `in` that inductor compiles into one loop
    reading each int8 row once, in float32 (faster than torch's int8 kernel up to FUSED_MAX_IN, and without
    its rounding of the activations to bfloat16). Eagerly it would build the float W: compiled use only."""
    return (x[:, None, :].float() * weight[None].float()).sum(-1) * scales.float()


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, fused: bool = True) -> torch.Tensor:
    if fused and torch.compiler.is_compiling() and x.numel() == x.shape[-1] and weight.shape[1] <= FUSED_MAX_IN:
        return fused_int8_row(x.reshape(1, -1), weight, scales).reshape(*x.shape[:-1], -1).to(x.dtype)
    # In bfloat16: torch's x86 kernel is vectorised for bfloat16 activations only; with float32 ones it runs a
    # scalar loop, several times slower than the float32 matmul it replaces.
    y = int8_weight_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight, scales.to(torch.bfloat16))
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


class Int8Linear(QuantizedLinear):
    """Weight-only int8 W (inference): reads a quarter of float32's bytes for the same product."""

    fused_rows = True  # compiled decode rows through fused_int8_row (a benchmark turns it off to compare)

    def __init__(self, linear: AdapterLinear):
        super().__init__(linear)
        weight, scales = quantize_rows(linear.weight.data)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scales", scales)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight_int8, self.scales, self.fused_rows)


class Int8Head(nn.Module):
    """The output head in weight-only int8."""

    fused_rows = Int8Linear.fused_rows

    def __init__(self, head: nn.Linear):
        super().__init__()
        weight, scales = quantize_rows(head.weight.data)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight_int8, self.scales, self.fused_rows)


def quantize_int8_(model: LLaMAAdapter) -> LLaMAAdapter:
    """Weight-only int8 for every frozen block matmul and the output head (inference only)."""
    return quantize_(model, "int8")


class Linear8bit(QuantizedLinear):
    """bitsandbytes LLM.int8 W: int8 storage, outliers in 16-bit (training's 8-bit base)."""

    def __init__(self, linear: AdapterLinear):
        import bitsandbytes as bnb

        super().__init__(linear)
        weight = linear.weight.data
        layer = bnb.nn.Linear8bitLt(self.shape[1], self.shape[0], bias=False, has_fp16_weights=False,
                                    device=weight.device)
        layer.weight = bnb.nn.Int8Params(weight.half().contiguous(), requires_grad=False, has_fp16_weights=False)
        self.int8 = layer.to(weight.device)  # bitsandbytes quantizes here

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        return self.int8(x)


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401  (only to tell a missing install in one line)
    except ImportError:
        raise Lav2Error("8-bit needs bitsandbytes: pip install 'lav2[8bit]' (or pip install bitsandbytes)") from None


def quantize_8bit_(model: LLaMAAdapter) -> LLaMAAdapter:
    """bitsandbytes LLM.int8 for every frozen block matmul (the 8-bit base of `load_in_8bit`)."""
    require_bitsandbytes()
    return quantize_(model, "8bit")


# --- prefill -----------------------------------------------------------------------------------------------


def prefill_dtype(model: LLaMAAdapter) -> Optional[torch.dtype]:
    """The dtype to prefill a prompt in: bfloat16 for float32 weights on a CPU with bfloat16 matmul instructions
    (AVX512-BF16, AMX), where a prompt's matrix-matrix products are compute-bound and run faster in it (a decode
    step, bandwidth-bound, keeps the stored weights); None (as stored) elsewhere, quantized models included (their
    kernels choose their own compute dtype)."""
    weight, linear = model.tok_embeddings.weight, model.layers[0].attention.wq
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    stored_float32 = weight.dtype == torch.float32 and not isinstance(linear, QuantizedLinear)
    return torch.bfloat16 if weight.device.type == "cpu" and stored_float32 and native else None


# --- compiled decoding -------------------------------------------------------------------------------------


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
    """model.attention for one query per head (a decode step), as products and sums: each key/value head is
    shared by its H/K query heads without a copy, and torch.compile fuses it into loops that read the cache
    once (SDPA's CPU kernel has a high fixed cost per call for one query and streams a long cache slowly).
    Eagerly it is no faster than SDPA, so only compiled CPU decoding uses it. Other shapes go to SDPA."""
    if q.shape[2] != 1 or causal:
        return attention(q, k, v, mask, causal)
    B, H, _, D = q.shape
    K = k.shape[1]
    q = q.view(B, K, H // K, 1, D)
    k, v = k[:, :, None], v[:, :, None]  # (B, K, 1, S, D)
    scores = (q * k).sum(-1, keepdim=True) * D ** -0.5  # (B, K, H/K, S, 1)
    if mask is not None:  # (B or 1, 1, 1, S) -> (B or 1, 1, 1, S, 1)
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1, 1), float("-inf"))
    out = (scores.softmax(dim=-2) * v).sum(-2, keepdim=True)  # (B, K, H/K, 1, D)
    return out.view(B, H, 1, D)


def compiled_decode_step(model: LLaMAAdapter, step: Callable) -> Callable:
    """`step` (generate.decode_one_token) through torch.compile, with the model's attention swapped for the fused
    single-query kernel on the CPU. Compiled at the first call and once more at the second, when the position
    becomes symbolic (tens of seconds on a CPU); one graph then serves every later token."""
    if model.tok_embeddings.weight.device.type == "cpu":
        for layer in model.layers:
            layer.attention.attend = single_query_attention
    # inductor's C++ build warns "No CUDA runtime is found" on every CPU-only machine, in the middle of an answer
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return _compiled(step)


@functools.cache
def _compiled(step: Callable) -> Callable:
    return torch.compile(step)
