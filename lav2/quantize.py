"""Quantized frozen matmuls: bitsandbytes 8-bit (training and CUDA chat) and weight-only int8 (fast CPU decode).

Both swap what computes `W x` inside each AdapterLinear (its `quantized` slot) and drop the float W; the
trainable bias/scale/LoRA around it are untouched. Quantize after the float weights are loaded: an 8-bit
bitsandbytes layer quantizes when moved with .to(), and loading floats into it afterwards silently zeroes it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lav2.errors import Lav2Error
from lav2.model import AdapterLinear, LLaMAAdapter, empty_on_huge_pages, unstack_


def adapter_linears(model: LLaMAAdapter) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear) and m.quantized is None]


def quantize_8bit_(model: LLaMAAdapter) -> LLaMAAdapter:
    """bitsandbytes LLM.int8 for every frozen block matmul (the 8-bit base of `load_in_8bit`)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise Lav2Error("8-bit needs bitsandbytes: pip install 'lav2[8bit]' (or pip install bitsandbytes)") from None
    unstack_(model)  # the stacked float matrices would outlive the quantized ones
    for linear in adapter_linears(model):
        out_features, in_features = linear.weight.shape
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                    device=linear.weight.device)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.half().contiguous(), requires_grad=False, has_fp16_weights=False)
        linear.quantized = layer.to(linear.weight.device)  # bitsandbytes quantizes here
        linear.weight = None
    return model


@torch.library.custom_op("lav2::int8_weight_mm", mutates_args=())
def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torch's int8-weight kernel as an opaque op: torch.compile's inductor fails to lower it after a fused cast
    (torch 2.14), and calls it as it is this way."""
    return torch._weight_int8pack_mm(x, weight, scales)


@int8_weight_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class Int8Linear(nn.Module):
    """Weight-only int8 with one scale per output row: W ~ scales[:, None] * W_int8. Runs torch's int8-weight
    kernel, which reads a quarter of float32's bytes for the same matrix-vector product."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
        quantized = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        if weight.device.type == "cpu":  # (out, in) rows, as the kernel wants them, on huge pages as decode_layout
            quantized = empty_on_huge_pages(*quantized.shape, dtype=torch.int8).copy_(quantized)
        self.register_buffer("weight", quantized.contiguous())
        self.register_buffer("scales", scales.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In bfloat16: torch's x86 kernel is vectorised for bfloat16 activations only; with float32 ones it runs a
        # scalar loop, several times slower than the float32 matmul it replaces (measured with lav2.bench).
        y = int8_weight_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight, self.scales.to(torch.bfloat16))
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def quantize_int8_(model: LLaMAAdapter) -> LLaMAAdapter:
    """Weight-only int8 for every frozen block matmul and the output head (inference only)."""
    unstack_(model)  # the stacked float matrices would outlive the quantized ones
    for linear in adapter_linears(model):
        linear.quantized = Int8Linear(linear.weight.data)
        linear.weight = None
    if isinstance(model.output, nn.Linear):
        model.output = Int8Linear(model.output.weight.data)
    return model
