"""LLaMA-Adapter V2 (Gao et al., arXiv 2304.15010) in one file.

A frozen LLaMA made into a visual instruction model by a few trainable parts:

- bias tuning: every chosen linear computes  y = scale * (W x + bias)  (+ LoRA in some released files);
  W is frozen, bias starts at 0 and scale at 1, so the model starts as the base model exactly;
- gated adapter prompts: the top `adapter_layers` layers own `adapter_len` learned tokens, attended to
  through a separate softmax whose output is multiplied by tanh(gate), one zero-initialised gate per head;
- a visual branch: frozen open_clip ViT -> trainable projection and resampler -> `visual_len` tokens that
  reach the language model as prompts: "early" fusion (the paper) feeds them to the first `visual_layers`
  layers; "add" fusion (the official release) adds them to every adapter layer's prompt;
- two disjoint parameter groups, "visual" and "language", so caption and instruction data train apart.

Notation in shape comments:
    B batch, T tokens in this forward, S tokens in the KV cache, P prompt tokens,
    H query heads, K key/value heads, D head dim, C model width (dim), V vocabulary,
    N visual tokens, E visual width.

This file holds no file paths, tokenizer or sampling; see checkpoint.py, tokenizer.py, generate.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

# --- 1. Config ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    # the base LLaMA
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (LLaMA-1/2 7B, 13B)
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # SwiGLU width; None: Meta's rule from multiple_of
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # bias tuning and LoRA on the linears of every block
    bias_targets: tuple[str, ...] = ()
    scale_targets: tuple[str, ...] = ()
    lora_rank: int = 0  # 0: no LoRA. LoRA is W x + B(A x), no scaling
    lora_targets: tuple[str, ...] = LINEARS
    new_gate: bool = False  # an extra scalar on the prompt output (init 1, no tanh), as in the LoRA releases
    # gated adapter prompts in the top layers
    adapter_len: int = 0
    adapter_layers: int = 0
    # the visual branch
    visual_len: int = 0  # 0: a text-only model
    fusion: str = "early"  # "early": own prompts in the first visual_layers; "add": added to adapter prompts
    visual_layers: int = 0  # layers that receive visual prompts with early fusion
    clip_dim: int = 768  # width of the CLIP tokens after ln_post and proj
    visual_dim: int = 768
    visual_depth: int = 8
    visual_heads: int = 16
    visual_mlp_ratio: float = 4.0
    bgr: bool = False  # the official release read images with cv2, so its visual branch expects BGR

    def __post_init__(self):
        self.bias_targets, self.scale_targets = tuple(self.bias_targets), tuple(self.scale_targets)
        self.lora_targets = tuple(self.lora_targets)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        problems = []
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            problems.append(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads} do not divide")
        for name in (*self.bias_targets, *self.scale_targets, *self.lora_targets):
            if name not in LINEARS:
                problems.append(f"unknown linear {name!r} (choose from {', '.join(LINEARS)})")
        if self.lora_rank and self.scale_targets:
            problems.append("scale and LoRA on the same model are not supported (no layout needs both)")
        if self.fusion not in ("early", "add"):
            problems.append(f"fusion must be 'early' or 'add', not {self.fusion!r}")
        if not 0 <= self.adapter_layers <= self.n_layers or not 0 <= self.visual_layers <= self.n_layers:
            problems.append("adapter_layers and visual_layers must be between 0 and n_layers")
        if self.visual_len and self.fusion == "add" and (self.adapter_layers == 0 or self.visual_len != self.adapter_len):
            problems.append("'add' fusion adds the visual tokens to the adapter prompts: needs visual_len == adapter_len > 0")
        if self.visual_len and self.fusion == "early" and self.visual_layers == 0:
            problems.append("'early' fusion needs visual_layers > 0")
        if self.fusion == "early" and self.visual_len and self.visual_layers + self.adapter_layers > self.n_layers:
            problems.append("with 'early' fusion the visual and the adapter layers must not overlap")
        if self.visual_len and self.visual_dim % self.visual_heads:
            problems.append(f"visual_dim {self.visual_dim} is not a multiple of visual_heads {self.visual_heads}")
        if problems:
            raise ValueError("bad model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def has_prompts(self) -> bool:
        return self.adapter_layers > 0 or self.visual_len > 0

    def prompt_layers(self) -> dict[int, str]:
        """Which layers receive a prompt: layer index -> "adapter" or "visual"."""
        kinds = {i: "adapter" for i in range(self.n_layers - self.adapter_layers, self.n_layers)}
        if self.visual_len and self.fusion == "early":
            kinds.update({i: "visual" for i in range(self.visual_layers)})
        return kinds

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("bias_targets", "scale_targets", "lora_targets"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def base(self) -> "Config":
        """The same LLaMA with nothing added."""
        return replace(self, bias_targets=(), scale_targets=(), lora_rank=0, new_gate=False, adapter_len=0,
                       adapter_layers=0, visual_len=0, visual_layers=0, bgr=False)


LLAMA_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6)
LLAMA_13B = dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-6)
LLAMA2 = dict(norm_eps=1e-5, max_seq_len=4096)
TINY = dict(dim=64, n_layers=4, n_heads=4, vocab_size=320, multiple_of=16, max_seq_len=256)
TINY_CLIP = dict(clip_dim=32, visual_dim=32, visual_depth=2, visual_heads=4)
# the release's 16 visual heads (shapes cannot tell the head count, so an imported file gets the preset's)
TINY_OFFICIAL_VISUAL = dict(clip_dim=32, visual_dim=64, visual_depth=2, visual_heads=16, adapter_len=4,
                            adapter_layers=3, visual_len=4)

# The official release (OpenGVLab/LLaMA-Adapter, llama_adapter_v2_multimodal7b): biases on wq, wo, w1, w2, w3
# and no scale; 10 prompt tokens in each of the top 31 layers; a resampler of 10 queries and 8 ViT blocks
# (768 wide, 16 heads) whose output is added to every layer's prompt; LoRA rank 16 with `new_gate`; BGR input.
OFFICIAL = dict(bias_targets=("wq", "wo", "w1", "w2", "w3"), adapter_len=10, adapter_layers=31, visual_len=10,
                fusion="add", clip_dim=768, visual_dim=768, visual_depth=8, visual_heads=16, bgr=True,
                max_seq_len=512)
OFFICIAL_LORA = dict(OFFICIAL, lora_rank=16, new_gate=True)
# The paper's layout, our training default: bias and scale on all seven linears, adapter prompts in the top
# 30 layers (as LLaMA-Adapter V1) and the visual prompts fed early, into the first layer only.
PAPER = dict(bias_targets=LINEARS, scale_targets=LINEARS, adapter_len=10, adapter_layers=30, visual_len=10,
             fusion="early", visual_layers=1, clip_dim=768, visual_dim=768, visual_depth=8, visual_heads=16,
             max_seq_len=512)

PRESETS: dict[str, dict] = {
    "tiny": TINY,
    "tiny-paper": dict(PAPER, **TINY, **TINY_CLIP, adapter_len=4, adapter_layers=3, visual_len=4, visual_layers=1),
    "tiny-official": dict(OFFICIAL, **TINY, **TINY_OFFICIAL_VISUAL),
    "tiny-official-lora": dict(OFFICIAL_LORA, **TINY, **TINY_OFFICIAL_VISUAL, lora_rank=4),
    "llama-7b": LLAMA_7B,
    "llama-13b": LLAMA_13B,
    "llama2-7b": dict(LLAMA_7B, **LLAMA2),
    "llama2-13b": dict(LLAMA_13B, **LLAMA2),
    "paper-7b": dict(LLAMA_7B, **PAPER),
    "official-bias-7b": dict(LLAMA_7B, **OFFICIAL),
    "official-lora-bias-7b": dict(LLAMA_7B, **OFFICIAL_LORA),
    "official-caption-7b": dict(LLAMA_7B, **OFFICIAL),
    "official-lora-bias-7b-v21": dict(LLAMA_7B, **OFFICIAL_LORA),
}

# --- 2. Pieces ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs_cis(head_dim: int, max_len: int, theta: float, device=None) -> torch.Tensor:
    """RoPE angles as (max_len, D/2, 2) cos/sin pairs: Meta's complex rotation written in real numbers."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x (B, T, H, D) by freqs_cis (T or B, T, D/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    cos, sin = freqs_cis[..., None, :, 0], freqs_cis[..., None, :, 1]  # (T or B, T, 1, D/2)
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 0] * sin + pairs[..., 1] * cos
    return torch.stack([real, imag], dim=-1).flatten(-2).type_as(x)


def fold_linear(weight, bias=None, scale=None, lora_a=None, lora_b=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """scale * (W x + bias + B(A x)) as one plain linear: W' = diag(scale)(W + B A), bias' = scale * bias.
    Computed in float32, returned in the dtypes given."""
    folded = weight.float()
    if lora_a is not None:
        folded = folded + lora_b.float() @ lora_a.float()
    if scale is not None:
        folded = folded * scale.float()[:, None]
        if bias is not None:
            bias = (bias.float() * scale.float()).to(bias.dtype)
    return folded.to(weight.dtype), bias


class AdapterLinear(nn.Module):
    """A frozen linear W with the trainable extras of bias tuning: y = scale * (W x + bias + B(A x)).

    `frozen(x)` computes W x and is all that a speed or memory variant replaces (see fastpath.py, which swaps
    in int8 and 8-bit subclasses at load time); the extras are the same parameters in every variant.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, scale: bool, lora_rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.scale = nn.Parameter(torch.empty(out_features)) if scale else None
        self.lora_a = nn.Parameter(torch.empty(lora_rank, in_features)) if lora_rank else None
        self.lora_b = nn.Parameter(torch.empty(out_features, lora_rank)) if lora_rank else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The extras' initial values, which leave the linear equal to W: bias 0, scale 1, LoRA's B 0 (A random,
        nn.Linear's own init, as the release). W is not touched: it comes from the base checkpoint."""
        for p, value in ((self.bias, 0.0), (self.scale, 1.0), (self.lora_b, 0.0)):
            if p is not None:
                p.fill_(value)
        if self.lora_a is not None:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def project_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """scale * (W x), without bias and LoRA: how a prompt becomes keys and values. The release projects
        prompts with the bare W (its LoRA and biases sit outside); leaving the bias out keeps a zero prompt inert,
        and keeping the scale lets merge fold it into W exactly."""
        y = self.frozen(x)
        return y if self.scale is None else y * self.scale.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.frozen(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b)
        if self.scale is not None:  # in y's dtype: under bf16 autocast a float32 scale would promote y to float32
            y = y * self.scale.to(y.dtype)
        return y

    @torch.no_grad()
    def fold_(self, *, lora: bool = True) -> None:
        """Fold scale (and LoRA, unless lora=False) into W and bias (see fold_linear)."""
        lora_a, lora_b = (self.lora_a, self.lora_b) if lora else (None, None)
        weight, bias = fold_linear(self.weight, self.bias, self.scale, lora_a, lora_b)
        self.weight.copy_(weight)  # in place: the weight keeps the storage the loader chose (fastpath)
        if bias is not None:
            self.bias.data = bias
        self.scale = None
        if lora:
            self.lora_a = self.lora_b = None


def adapter_linear(config: Config, name: str, fan_in: int, fan_out: int) -> AdapterLinear:
    """The block linear `name` (wq ... w3) with the extras the config gives it."""
    return AdapterLinear(fan_in, fan_out, bias=name in config.bias_targets, scale=name in config.scale_targets,
                         lora_rank=config.lora_rank if name in config.lora_targets else 0)


# --- 3. KV cache -------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far, and of this layer's prompt.

    The prompt's keys/values depend only on the prompt (learned tokens and the image), so the forward that
    starts a sequence (position 0) computes them and stores them here (`prompt_kv`, None for no prompt); every
    later forward of that sequence reads them from here.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.prompt_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (B or 1, K, P, D) each

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at positions start_pos ... start_pos + T - 1; return the cache up to there."""
        B, end = k.shape[0], start_pos + k.shape[2]
        self.k_cache[:B, :, start_pos:end] = k
        self.v_cache[:B, :, start_pos:end] = v
        return self.k_cache[:B, :, :end], self.v_cache[:B, :, :end]


# --- 4. Transformer layers ---------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q (B, H, T, D) and k, v (B, K, S, D), each K/V head shared by H/K query
    heads; mask (B or 1, 1, T, S) bool: True where a query may attend."""
    H, K = q.shape[1], k.shape[1]
    if K != H:  # grouped-query attention
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        shapes = dict(wq=(config.dim, config.dim), wk=(config.dim, kv_dim), wv=(config.dim, kv_dim),
                      wo=(config.dim, config.dim))
        for name, (fan_in, fan_out) in shapes.items():
            setattr(self, name, adapter_linear(config, name, fan_in, fan_out))
        # Every layer of an adapter model owns a gate, as the release does (its files hold one per layer);
        # a layer that receives no prompt never reads its gate and param_groups leaves it frozen.
        self.gate = nn.Parameter(torch.empty(1, config.n_heads, 1, 1)) if config.has_prompts else None
        self.new_gate = nn.Parameter(torch.empty(1, 1, 1, 1)) if config.new_gate else None
        self.kv_cache: Optional[KVCache] = None
        self.attend = attention  # the attention kernel: fastpath swaps in a fused one for compiled decoding
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gates start closed (tanh(0) = 0: the prompts add nothing) and new_gate at 1, as the release."""
        if self.gate is not None:
            self.gate.zero_()
        if self.new_gate is not None:
            self.new_gate.fill_(1.0)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: Optional[int] = None,
                prompt: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H or K, T, D)

        prompt_kv = None if prompt is None else self.prompt_kv(prompt, B)
        if start_pos is None:  # training or a plain forward: the whole sequence at once
            out = self.attend(q, k, v, mask, causal=True)
        else:  # KV-cache inference: T new tokens at positions start_pos ...
            k, v = self.kv_cache.update(start_pos, k, v)  # (B, K, S, D)
            if start_pos == 0:  # in the cache's dtype: a prefill under autocast computes them in bfloat16
                self.kv_cache.prompt_kv = prompt_kv and tuple(t.to(k.dtype) for t in prompt_kv)
            prompt_kv = self.kv_cache.prompt_kv
            if mask is None and T > 1:  # several new tokens: each sees the cache up to its own position
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(start_pos)  # (T, S)
            out = self.attend(q, k, v, mask)

        if prompt_kv is not None:
            # The prompt gets its own softmax (no mask, no RoPE), scaled by the zero-initialised tanh(gate).
            prompt_out = self.attend(q, *prompt_kv) * self.gate.tanh().to(q.dtype)  # (B, H, T, D)
            if self.new_gate is not None:
                prompt_out = prompt_out * self.new_gate.to(q.dtype)
            out = out + prompt_out
        return self.wo(out.transpose(1, 2).reshape(B, T, C))

    def prompt_kv(self, prompt: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, K, P, D) of the prompt tokens (B or 1, P, C) (see AdapterLinear.project_prompt)."""
        Bp, P, C = prompt.shape
        pk = self.wk.project_prompt(prompt).view(Bp, P, self.n_kv_heads, self.head_dim).transpose(1, 2)
        pv = self.wv.project_prompt(prompt).view(Bp, P, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return pk.expand(batch, -1, -1, -1), pv.expand(batch, -1, -1, -1)


class FeedForward(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        shapes = dict(w1=(config.dim, config.hidden_dim), w2=(config.hidden_dim, config.dim),
                      w3=(config.dim, config.hidden_dim))
        for name, (fan_in, fan_out) in shapes.items():
            setattr(self, name, adapter_linear(config, name, fan_in, fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs_cis, start_pos=None, prompt=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, prompt, mask)
        return h + self.feed_forward(self.ffn_norm(h))


# --- 5. Visual branch --------------------------------------------------------------------------------------


def encode_clip_tokens(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """All 1 + grid^2 tokens of the frozen CLIP tower after ln_post and proj, as the official release uses
    them (open_clip's own `output_tokens` drops the class token and skips proj). (B, 3, H, W) -> (B, N, clip_dim)"""
    x = clip.conv1(images.to(clip.conv1.weight.dtype))  # (B, width, grid, grid)
    x = x.flatten(2).transpose(1, 2)  # (B, grid^2, width)
    cls = clip.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + clip.positional_embedding.to(x.dtype)
    x = clip.transformer(clip.ln_pre(x))
    return clip.ln_post(x) @ clip.proj


class VisualBlock(nn.Module):
    """A pre-norm ViT block (timm's Block as the release used it: qkv bias, exact GELU, LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, E = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.n_heads, E // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, E / heads) each
        x = x + self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, E))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class VisualBranch(nn.Module):
    """Image -> frozen CLIP tokens -> trainable resampler -> (B, visual_len, dim) visual prompt tokens."""

    def __init__(self, config: Config):
        super().__init__()
        self.clip: Optional[nn.Module] = None  # frozen open_clip tower, attached by the loader
        self.clip_proj = nn.Linear(config.clip_dim, config.visual_dim)
        self.clip_proj_norm = nn.LayerNorm(config.visual_dim)
        self.visual_query = nn.Parameter(torch.empty(config.visual_len, config.visual_dim))
        self.visual_blocks = nn.ModuleList(
            VisualBlock(config.visual_dim, config.visual_heads, config.visual_mlp_ratio)
            for _ in range(config.visual_depth))
        self.visual_proj = nn.Linear(config.visual_dim, config.dim)
        self.visual_proj_norm = nn.LayerNorm(config.dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The learned queries as the release draws them; the linears and norms init themselves."""
        nn.init.normal_(self.visual_query, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            raise RuntimeError("the visual branch has no CLIP tower: load the model with lav2.load()")
        # CLIP stays frozen, in the dtype it was loaded in: not under an autocast meant for the LLaMA (torch's CPU
        # bfloat16 path for its attention is orders of magnitude slower for more than one image)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            tokens = encode_clip_tokens(self.clip, images)  # (B, N, clip_dim)
        dtype = self.clip_proj.weight.dtype
        x = self.clip_proj_norm(self.clip_proj(tokens.to(dtype)))  # (B, N, E)
        queries = self.visual_query.expand(x.shape[0], -1, -1)  # (B, visual_len, E)
        x = torch.cat([queries, x], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : queries.shape[1]]))  # (B, visual_len, C)


# --- 6. The model ------------------------------------------------------------------------------------------


class LLaMAAdapter(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        for frozen in (self.tok_embeddings.weight, self.output.weight):
            frozen.requires_grad_(False)
        self.adapter_query = (nn.Parameter(torch.empty(config.adapter_layers, config.adapter_len, config.dim))
                              if config.adapter_layers and config.adapter_len else None)
        self.visual = VisualBranch(config) if config.visual_len else None
        # non-persistent: rebuilt, not loaded (after a meta-device build call init_rope)
        self.register_buffer("freqs_cis", precompute_freqs_cis(config.head_dim, config.max_seq_len,
                                                               config.rope_theta), persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.adapter_query is not None:
            nn.init.normal_(self.adapter_query, std=0.02)

    def init_rope(self, device=None) -> None:
        c = self.config
        self.freqs_cis = precompute_freqs_cis(c.head_dim, c.max_seq_len, c.rope_theta, device=device)

    def setup_cache(self, batch_size: int, max_seq_len: Optional[int] = None, *, device=None, dtype=None) -> None:
        """Preallocate a KV cache per layer for decoding; forward(..., start_pos=...) then uses it."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if max_seq_len > self.freqs_cis.shape[0]:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.freqs_cis.shape[0]} positions")
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.config.n_kv_heads, max_seq_len,
                                               self.config.head_dim, dtype=dtype, device=device)

    def cache_length(self) -> int:
        """Positions the KV cache holds (0 when there is none)."""
        cache = self.layers[0].attention.kv_cache
        return 0 if cache is None else cache.k_cache.shape[2]

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def layer_prompts(self, visual_tokens: Optional[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The prompt each layer attends to: layer index -> (B or 1, P, C)."""
        prompts, kinds = {}, self.config.prompt_layers()
        adapter_layers = [i for i, kind in sorted(kinds.items()) if kind == "adapter"]
        for j, i in enumerate(adapter_layers):
            prompt = self.adapter_query[j][None]  # (1, adapter_len, C)
            if self.config.fusion == "add" and visual_tokens is not None:
                prompt = prompt + visual_tokens  # (B, P, C): one image adds to every adapter layer
            prompts[i] = prompt
        if visual_tokens is not None and self.config.fusion == "early":
            prompts.update({i: visual_tokens for i, kind in kinds.items() if kind == "visual"})
        return prompts

    def forward(self, tokens: torch.Tensor, images: Optional[torch.Tensor] = None, *,
                image_mask: Optional[torch.Tensor] = None, start_pos: Optional[int] = None,
                pad: Optional[torch.Tensor] = None, head: bool = True) -> torch.Tensor:
        """Logits (B, T, V) in float32 for tokens (B, T); head=False: the final hidden states (B, T, C) after
        the last norm instead, for a caller that applies `output` to some positions only (training's loss).

        images (B, 3, H, W): preprocessed images; rows where image_mask (B,) is False get no visual prompt.
        start_pos: decode with the KV cache (see setup_cache), the tokens at positions start_pos ... start_pos + T - 1
        (a Python int, as Meta's: no host sync, and torch.compile traces it). The forward that starts at position
        0 computes the prompts and leaves their keys/values in the cache for the later ones.
        pad (B,): how many left-padding tokens each row starts with (a batch of prompts of different lengths):
        they are attended by no one, and each row counts its positions from its first real token, so a row
        computes what it would alone (RoPE reaches the prompts, which have no positions of their own).
        """
        B, T = tokens.shape
        if start_pos is not None:
            if torch.is_grad_enabled():
                raise RuntimeError("KV-cache decoding (start_pos) runs without gradients: use torch.no_grad()")
            if start_pos + T > self.cache_length():
                raise ValueError(f"positions {start_pos}..{start_pos + T - 1} do not fit the KV cache "
                                 f"({self.cache_length()} positions): call setup_cache")
        starts_sequence = start_pos is None or start_pos == 0
        if images is not None and not starts_sequence:
            raise ValueError("images can only be given to the forward that starts at position 0")
        if images is not None and self.visual is None:
            raise ValueError("this model has no visual branch (a text-only model): do not pass images")

        prompts: dict[int, torch.Tensor] = {}
        if starts_sequence and self.config.has_prompts:
            visual_tokens = None
            if images is not None:
                visual_tokens = self.visual(images)  # (B, visual_len, C)
                if image_mask is not None:  # rows without an image add nothing (prompt K/V have no bias)
                    visual_tokens = visual_tokens * image_mask.to(visual_tokens.dtype)[:, None, None]
            prompts = self.layer_prompts(visual_tokens)

        h = self.tok_embeddings(tokens)  # (B, T, C)
        start = start_pos or 0
        freqs_cis, mask = self.freqs_cis[start:start + T], None  # (T, D/2, 2)
        if pad is not None:
            query_pos = torch.arange(start, start + T, device=tokens.device)  # (T,)
            freqs_cis = self.freqs_cis[(query_pos[None] - pad[:, None]).clamp(min=0)]  # (B, T, D/2, 2)
            key_pos = torch.arange(start + T, device=tokens.device)  # (S,)
            mask = (key_pos >= pad[:, None, None]) & (key_pos <= query_pos[:, None])  # (B, T, S)
            mask = (mask | (key_pos == query_pos[:, None]))[:, None]  # (B, 1, T, S): a pad token sees itself
        for i, layer in enumerate(self.layers):
            prompt = prompts.get(i)
            if prompt is not None:
                prompt = prompt.to(h.dtype)
            if self.gradient_checkpointing and self.training:
                # Reentrant: the block runs under no_grad, so nothing in it is kept (non-reentrant keeps the graph,
                # and bitsandbytes 8-bit stashes every matmul input on it); it needs an input that requires grad.
                h = checkpoint(layer, h if h.requires_grad else h.detach().requires_grad_(), freqs_cis, start_pos,
                               prompt, mask, use_reentrant=True)
            else:
                h = layer(h, freqs_cis, start_pos, prompt, mask)
        h = self.norm(h)  # (B, T, C)
        return self.output(h).float() if head else h  # (B, T, V) or (B, T, C)


# --- 7. What trains ----------------------------------------------------------------------------------------


def param_groups(model: LLaMAAdapter) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The two disjoint groups of trainable parameters, as (name, parameter) lists.

    "visual": what carries the image (the resampler, and the gates through which the visual prompts enter).
    "language": what follows instructions (bias, scale, LoRA, norms, and the adapter prompts of the late layers).
    With "add" fusion the adapter prompts and gates carry the image too, so they join the visual group: this is
    the split of the release's two phases (pretrain: gates, prompts, visual; finetune: biases and norms).
    """
    config, named = model.config, dict(model.named_parameters())
    visual, language = [], []
    if model.visual is not None:
        visual += [f"visual.{n}" for n, _ in model.visual.named_parameters() if not n.startswith("clip.")]
    for i, kind in config.prompt_layers().items():
        gates = [f"layers.{i}.attention.{g}" for g in ("gate", "new_gate") if f"layers.{i}.attention.{g}" in named]
        (visual if kind == "visual" or config.fusion == "add" else language).extend(gates)
    if model.adapter_query is not None:
        (visual if config.fusion == "add" and config.visual_len else language).append("adapter_query")
    for i, layer in enumerate(model.layers):
        for module_name, module in layer.named_modules():
            if isinstance(module, AdapterLinear):
                language += [f"layers.{i}.{module_name}.{p}" for p in ("bias", "scale", "lora_a", "lora_b")
                             if getattr(module, p) is not None]
        language += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    language.append("norm.weight")
    return {"visual": [(n, named[n]) for n in visual], "language": [(n, named[n]) for n in language]}


def mark_trainable(model: LLaMAAdapter, groups: tuple[str, ...] = ("visual", "language")) -> None:
    """requires_grad on the parameters of `groups`, off everywhere else (base, CLIP, unused gates)."""
    model.requires_grad_(False)
    for group, params in param_groups(model).items():
        if group in groups:
            for _, p in params:
                p.requires_grad_(True)


EXTRAS = ("bias", "scale", "lora_a", "lora_b")  # what bias tuning adds to a linear


def base_parameter_names(model: LLaMAAdapter) -> set[str]:
    """The state dict keys of the frozen LLaMA matrices: embeddings, each block linear's W (in whatever form a
    fastpath variant stores it), the output head."""
    names = set()
    for prefix, module in model.named_modules():
        if prefix in ("tok_embeddings", "output") or isinstance(module, AdapterLinear):
            names |= {f"{prefix}.{k}" for k in module.state_dict() if k not in EXTRAS}
    return names


def adapter_state_dict(model: LLaMAAdapter) -> dict[str, torch.Tensor]:
    """Everything but the frozen LLaMA matrices and CLIP: what an adapter file stores (norms included)."""
    base = base_parameter_names(model)
    return {n: t for n, t in model.state_dict().items() if n not in base and not n.startswith("visual.clip.")}


# LoRA on these cannot fold into W: the prompts are projected by the bare W (see AdapterLinear.project_prompt)
PROMPT_LINEARS = ("wk", "wv")


def merged_config(config: Config) -> Config:
    """The config after folding: no scale; LoRA left only where it cannot fold."""
    kept = tuple(t for t in config.lora_targets if t in PROMPT_LINEARS) if config.lora_rank else ()
    return replace(config, scale_targets=(), lora_targets=kept, lora_rank=config.lora_rank if kept else 0)


def fold_adapters_(model: LLaMAAdapter) -> None:
    """Fold every scale and foldable LoRA into the frozen weights (biases stay): same logits, fewer ops."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            module.fold_(lora=name.rsplit(".", 1)[-1] not in PROMPT_LINEARS)
    model.config = merged_config(model.config)


def count_params(model: LLaMAAdapter) -> dict[str, int]:
    """Parameter counts: the base LLaMA (its matrices and norms), the adapter file, each group, CLIP."""
    groups, named = param_groups(model), dict(model.named_parameters())
    norms = {n for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    base = base_parameter_names(model) | {f"{n}.weight" for n in norms}
    adapter = adapter_state_dict(model)
    return {
        "base": sum(named[n].numel() for n in base),
        "adapter_tensors": len(adapter),
        "adapter": sum(t.numel() for t in adapter.values()),
        "visual": sum(p.numel() for _, p in groups["visual"]),
        "language": sum(p.numel() for _, p in groups["language"]),
        "clip": sum(p.numel() for n, p in named.items() if n.startswith("visual.clip.")),
    }
