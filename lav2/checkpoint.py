"""lav2 model folders, the importers of Meta, Hugging Face and official LLaMA-Adapter V2 weights, and merge.

A model folder is self-describing:

    lav2.json            {"format": "lav2", "version": 1, "config": {...}, "layout": preset name,
                          "weights": "model.safetensors" | null, "base": "../llama-7b" | null,
                          "adapter": "adapter.safetensors" | null, "clip": spec | null,
                          "prompt_style": "alpaca" | "chat", "source": {...}}
    model.safetensors    the frozen base LLaMA (absent when "base" names another folder that holds it)
    adapter.safetensors  the trainable tensors (model.adapter_state_dict: prompts, gates, bias/scale/LoRA,
                         norms, visual branch)
    clip.safetensors     the frozen CLIP vision tower, when the CLIP spec is {"config": ..., "weights": ...}
    tokenizer.model

A CLIP spec is {"name": "ViT-L-14", "pretrained": "openai"} (resolved by open_clip, which may download) or
{"config": <kwargs of open_clip.CLIP>, "weights": "clip.safetensors"} (a file inside the folder).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lav2 import fastpath, memory
from lav2.errors import Lav2Error
from lav2.images import Preprocess, make_preprocess
from lav2.model import (LINEARS, AdapterLinear, Config, LLaMAAdapter, PRESETS, adapter_state_dict,
                        base_parameter_names, fold_linear, mark_trainable,
                        merged_config)
from lav2.prompts import STYLES
from lav2.tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, ADAPTER_FILE, CLIP_FILE, TOKENIZER_FILE = (
    "lav2.json", "model.safetensors", "adapter.safetensors", "clip.safetensors", "tokenizer.model")

# dtypes by the names recipes, folders and command-line options use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CLIP of every official release and of the paper: open_clip's ViT-L/14 with OpenAI's weights
DEFAULT_CLIP = {"name": "ViT-L-14", "pretrained": "openai"}
DEFAULT_CLIP_DIM = 768  # its output width

# --- reading weight files safely ---------------------------------------------------------------------------


def read_torch_file(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain containers load, code-running pickles do not."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Unsupported" in str(e):
            raise Lav2Error(f"{path}: refused to load: not a weights-only checkpoint (it would run code when "
                            f"unpickled); use the original file or a safetensors copy") from None
        raise Lav2Error(f"{path}: cannot read as a PyTorch checkpoint ({reason}); the file may be truncated: "
                        f"download it again") from None


def read_safetensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise Lav2Error(f"{path}: cannot read as safetensors ({e}); the file may be truncated: download it "
                        f"again") from None


# --- key maps: Meta, Hugging Face and official adapter checkpoints to lav2 names -----------------------


# Meta's model-parallel shards split these along a dim; everything else is replicated (norms).
META_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "output": 0}


# A tensor not read yet: its shape, and how to read it (and convert it to lav2's form).
Lazy = tuple[torch.Size, Callable[[], torch.Tensor]]


def meta_to_lav2(shards: list[dict[str, torch.Tensor]]) -> dict[str, Lazy]:
    """Join Meta's consolidated.*.pth shards (memory-mapped); Meta's names are ours already."""
    joined = {}
    for key in shards[0]:
        if key == "rope.freqs":  # a cached RoPE table in some Meta files, recomputed by us
            continue
        parts = [shard[key] for shard in shards]
        dim = META_SHARD_DIM.get(key.split(".")[-2])
        if len(parts) == 1 or dim is None or key.endswith("norm.weight"):
            joined[key] = (parts[0].shape, lambda part=parts[0]: part)
        else:
            shape = list(parts[0].shape)
            shape[dim] = sum(part.shape[dim] for part in parts)
            joined[key] = (torch.Size(shape), lambda parts=parts, dim=dim: torch.cat(parts, dim))
    return joined


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's q/k permutation (made for rotate_half RoPE) back to Meta's interleaved pairs."""
    dim_out, dim_in = w.shape
    return w.view(n_heads, 2, dim_out // n_heads // 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


HF_LAYER_KEYS = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
HF_KEYS = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}


def hf_to_lav2(state: dict[str, Lazy], config: Config) -> dict[str, Lazy]:
    """Hugging Face LLaMA names to ours; q and k are un-permuted as they are read."""
    out = {}
    for key, (shape, read) in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in HF_KEYS:
            out[HF_KEYS[key]] = (shape, read)
        elif (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)) and m.group(2) in HF_LAYER_KEYS:
            name = HF_LAYER_KEYS[m.group(2)]
            heads = {"attention.wq": config.n_heads, "attention.wk": config.n_kv_heads}.get(name)
            if heads is not None:
                read = (lambda read=read, heads=heads: unpermute_rope(read(), heads))
            out[f"layers.{m.group(1)}.{name}.weight"] = (shape, read)
        else:
            raise Lav2Error(f"unexpected Hugging Face weight {key}: not a LLaMA checkpoint")
    if "output.weight" not in out and "tok_embeddings.weight" in out:  # tied embeddings
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


OFFICIAL_VISUAL = ("clip_proj.", "clip_proj_norm.", "visual_blocks.", "visual_proj.", "visual_proj_norm.")


def official_to_lav2(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Official LLaMA-Adapter V2 adapter keys to lav2 keys; unknown keys are kept as they are, so that the
    strict check after the map names them."""
    out = {}
    for key, tensor in state.items():
        if key == "adapter_query.weight":  # an Embedding of (layers * len, dim) rows
            out["adapter_query"] = tensor.reshape(-1, config.adapter_len, tensor.shape[-1])
        elif key == "visual_query.weight":
            out["visual.visual_query"] = tensor
        elif key.startswith(OFFICIAL_VISUAL):
            out[f"visual.{key}"] = tensor
        elif m := re.fullmatch(r"llama\.layers\.(\d+)\.(attention|feed_forward)\.lora_(\w+)_l([12])\.weight", key):
            out[f"layers.{m.group(1)}.{m.group(2)}.{m.group(3)}.lora_{'a' if m.group(4) == '1' else 'b'}"] = tensor
        elif key.startswith("llama."):
            out[key[len("llama."):]] = tensor
        else:
            out[key] = tensor
    return out


def biased_linears(state: dict[str, torch.Tensor], n_layers: int) -> tuple[str, ...]:
    """The linears that carry a bias in most layers: a stray or lost key then shows as unexpected or missing."""
    counts = {t: sum(bool(re.fullmatch(rf"llama\.layers\.\d+\.\w+\.{t}\.bias", k)) for k in state) for t in LINEARS}
    return tuple(t for t in LINEARS if counts[t] * 2 > n_layers)


def official_layout(state: dict[str, torch.Tensor], meta: dict, name: str, base: Config) -> tuple[str, Config]:
    """Pick the official layout from the file's config and keys; sizes come from the tensor shapes, the
    visual blocks' head count (which shapes cannot tell) from the preset."""
    has_lora = any(".lora_" in k for k in state)
    if bool(meta.get("w_lora", False)) != has_lora:
        raise Lav2Error(f"{name}: its config says w_lora={meta.get('w_lora')} but the file "
                        f"{'has' if has_lora else 'has no'} LoRA weights; the file is inconsistent")
    for key in ("adapter_query.weight", "visual_query.weight", "clip_proj.weight"):
        if key not in state:
            raise Lav2Error(f"{name}: not an official LLaMA-Adapter V2 multimodal checkpoint (no {key})")
    # the release's names (BIAS-7B, CAPTION-7B, ...) pick the preset when the keys agree with it
    named = f"official-{Path(name).stem.split('_', 1)[-1].lower()}"
    layout = named if named in PRESETS and (PRESETS[named].get("lora_rank", 0) > 0) == has_lora else (
        "official-lora-bias-7b" if has_lora else "official-bias-7b")
    adapter_len, visual_dim = state["visual_query.weight"].shape
    lora_a = state.get("llama.layers.0.attention.lora_wq_l1.weight")
    try:
        config = replace(
            base, bias_targets=biased_linears(state, base.n_layers),
            scale_targets=(), lora_rank=0 if lora_a is None else lora_a.shape[0], new_gate=has_lora,
            adapter_len=adapter_len, adapter_layers=state["adapter_query.weight"].shape[0] // adapter_len,
            visual_len=adapter_len, fusion="add", visual_layers=0, bgr=True,
            clip_dim=state["clip_proj.weight"].shape[1], visual_dim=visual_dim,
            visual_depth=len({k.split(".")[1] for k in state if k.startswith("visual_blocks.")}),
            visual_heads=Config.from_name(layout).visual_heads)
    except ValueError as e:
        raise Lav2Error(f"{name}: its shapes do not fit the base model ({e})") from None
    return layout, config


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Strict: every expected key present with its shape, nothing else. One line naming what differs."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise Lav2Error(f"{what} does not match the model: " + "; ".join(problems))


# --- recognising source folders ----------------------------------------------------------------------------


@dataclass
class Source:
    kind: str  # "meta" or "hf"
    config: Config
    weight_files: list[Path]
    tokenizer: Path


def read_json(path: Path) -> dict:
    """A JSON file (config.json, params.json, lav2.json ...); a UTF-8 byte-order mark, as Windows editors write,
    is dropped."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise Lav2Error(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file or "
                        f"download it again") from None
    except UnicodeDecodeError as e:
        raise Lav2Error(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start}); save it as "
                        f"UTF-8") from None
    except OSError as e:
        raise Lav2Error(f"{path}: cannot be read ({e.strerror or e})") from None


def find_source(src: Path) -> Source:
    """A Meta folder (params.json + consolidated.*.pth, or Meta's download with a 7B/ subfolder) or a Hugging
    Face folder (config.json + *.safetensors or pytorch_model*.bin); tokenizer.model beside or one level up."""
    if not src.exists():
        raise Lav2Error(f"{src}: no such folder; give a Meta or Hugging Face LLaMA folder, or a registry name")
    if not src.is_dir():
        raise Lav2Error(f"{src}: not a folder; give the folder that holds the LLaMA weights")
    subfolders = sorted(p.parent for p in src.glob("*/params.json"))
    if not (src / "params.json").exists() and not (src / "config.json").exists() and len(subfolders) == 1:
        return find_source(subfolders[0])
    tokenizer = next((p for p in (src / TOKENIZER_FILE, src.parent / TOKENIZER_FILE) if p.is_file()), None)
    if (src / "params.json").exists():
        kind, files = "meta", sorted(src.glob("consolidated.*.pth"))
        if not files:
            raise Lav2Error(f"{src}: has params.json but no consolidated.*.pth weight files")
        config = config_from_meta(read_json(src / "params.json"), files[0])
    elif (src / "config.json").exists():
        kind = "hf"
        files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
        if not files:
            raise Lav2Error(f"{src}: has config.json but no *.safetensors or pytorch_model*.bin weight files")
        config = config_from_hf(read_json(src / "config.json"), src)
    else:
        raise Lav2Error(f"{src}: unknown format: expected a Meta LLaMA folder (params.json, consolidated.*.pth) "
                        f"or a Hugging Face one (config.json, *.safetensors)")
    if tokenizer is None:
        raise Lav2Error(f"{src}: no tokenizer.model (the SentencePiece model that comes with LLaMA) in the "
                        f"folder or its parent; copy it there")
    return Source(kind, config, files, tokenizer)


def config_from_meta(params: dict, first_shard: Path) -> Config:
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")
    try:
        config = {k: params[k] for k in keys if params.get(k) is not None}
        # vocab_size is -1 in LLaMA-1's params.json: read it from the embedding (cheap with mmap)
        config["vocab_size"] = read_torch_file(first_shard)["tok_embeddings.weight"].shape[0] * (
            1 if params.get("vocab_size", -1) <= 0 else 0) or params["vocab_size"]
        return Config(**config)
    except (KeyError, TypeError, ValueError) as e:
        raise Lav2Error(f"{first_shard.parent}/params.json: not a LLaMA params.json ({e})") from None


def config_from_hf(hf: dict, src: Path) -> Config:
    if hf.get("model_type") != "llama":
        raise Lav2Error(f"{src}/config.json: model_type {hf.get('model_type')!r} is not 'llama'; lav2 supports "
                        f"LLaMA-architecture models")
    if hf.get("rope_scaling") or hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise Lav2Error(f"{src}/config.json: rope_scaling, attention/mlp biases or a non-SiLU activation are not "
                        f"supported (only the plain LLaMA architecture)")
    try:
        return Config(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                      n_kv_heads=hf.get("num_key_value_heads"), vocab_size=hf["vocab_size"],
                      hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                      rope_theta=hf.get("rope_theta", 10000.0), max_seq_len=hf.get("max_position_embeddings", 2048))
    except (KeyError, TypeError, ValueError) as e:
        raise Lav2Error(f"{src}/config.json: not a LLaMA config ({e})") from None


def read_base_weights(source: Source) -> dict[str, Lazy]:
    """A source folder's weights under lav2 names, none read yet (safetensors headers, memory-mapped pickles)."""
    if source.kind == "meta":
        return meta_to_lav2([read_torch_file(f) for f in source.weight_files])
    state: dict[str, Lazy] = {}
    for f in source.weight_files:
        if f.suffix == ".safetensors":
            state.update({k: (t.shape, lambda f=f, k=k: next(read_tensors([f], only={k}))[1])
                          for k, t in tensor_shapes([f]).items()})
        else:
            state.update({k: (t.shape, lambda t=t: t) for k, t in read_torch_file(f).items()})
    return hf_to_lav2(state, source.config)


# A shard of a written base. Import and merge hold one in memory, twice while safetensors serialises it.
SHARD_BYTES = 2**30


def shards(tensors: Iterator[tuple[str, torch.Tensor]], max_bytes: Optional[int] = None) -> Iterator[dict[str, torch.Tensor]]:
    """(key, tensor) pairs grouped into state dicts of at most max_bytes (default SHARD_BYTES) or one tensor,
    for write_folder."""
    max_bytes = max_bytes or SHARD_BYTES
    shard, size = {}, 0
    for key, tensor in tensors:
        if shard and size + tensor.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor.contiguous()
        size += tensor.nbytes
    if shard:
        yield shard


def meta_model(config: Config) -> LLaMAAdapter:
    """A model with this config on the meta device: its names and shapes, for free."""
    with torch.device("meta"):
        return LLaMAAdapter(config)


def base_state_names(model: LLaMAAdapter) -> set[str]:
    """What a base folder's weights file holds: the frozen matrices and the norms."""
    return base_parameter_names(model) | {k for k in model.state_dict()
                                          if k.endswith("norm.weight") and not k.startswith("visual.")}


# --- CLIP ---------------------------------------------------------------------------------------------------


def inspect_clip_folder(folder: Path) -> tuple[dict, Path, dict[str, torch.Tensor]]:
    """A folder with open_clip_config.json (the kwargs of open_clip.CLIP, or the hub's {"model_cfg": ...}) and
    open_clip_model.safetensors: the model config, the weights file, and the vision tower's tensors as meta
    tensors (their shapes; the text tower, which lav2 never uses, is never read)."""
    cfg_file, weights_file = folder / "open_clip_config.json", folder / "open_clip_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise Lav2Error(f"{folder}: no {f.name}; a CLIP folder holds open_clip_config.json and "
                            f"open_clip_model.safetensors")
    cfg = read_json(cfg_file)
    visual = {k: v for k, v in tensor_shapes([weights_file]).items() if k.startswith("visual.")}
    if not visual:
        raise Lav2Error(f"{weights_file}: holds no visual.* weights (not an open_clip CLIP)")
    return cfg.get("model_cfg", cfg), weights_file, visual


def read_clip_visual(weights_file: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors `names` ("visual.*") of an open_clip weights file, under the tower's own names."""
    return {k[len("visual."):]: v for k, v in read_tensors([weights_file], only=names)}


def read_clip_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A CLIP folder's config and its vision tower's weights (see inspect_clip_folder)."""
    cfg, weights_file, visual = inspect_clip_folder(folder)
    return cfg, read_clip_visual(weights_file, set(visual))


def build_clip_visual(clip_config: dict) -> nn.Module:
    """open_clip's vision tower from an open_clip model config (the kwargs of open_clip.CLIP), on the current
    default device (build under torch.device("meta") and load weights with assign=True)."""
    import open_clip  # lazily: a text-only model never needs it

    return open_clip.CLIP(**clip_config).visual


def clip_params(spec: Optional[dict]) -> int:
    """Parameters of a CLIP spec's vision tower, counted on the meta device (nothing is read or downloaded)."""
    if spec is None:
        return 0
    if "config" in spec:
        kwargs = spec["config"]
    else:
        import open_clip

        kwargs = open_clip.get_model_config(spec["name"])
        if kwargs is None:
            return 0  # an unknown name fails with its own message when the CLIP loads
    with torch.device("meta"):
        return sum(p.numel() for p in build_clip_visual(kwargs).parameters())


def load_clip(spec: dict, folder: Path, device) -> tuple[torch.nn.Module, Callable]:
    """The frozen CLIP vision tower and its eval transform (PIL image -> tensor), from a CLIP spec."""
    import open_clip

    if "name" in spec:
        try:
            model, _, transform = open_clip.create_model_and_transforms(spec["name"], pretrained=spec.get("pretrained"))
        except Exception as e:  # network, unknown name: open_clip raises many kinds
            raise Lav2Error(f"CLIP {spec['name']}/{spec.get('pretrained')} could not be loaded ({e}); run "
                            f"`lav2 download` for a self-contained folder") from None
        visual = model.visual.to(device)
    else:
        with torch.device("meta"):
            visual = build_clip_visual(spec["config"])
        weights = read_safetensors(folder / spec["weights"])
        check_state(weights, visual.state_dict(), f"{folder / spec['weights']}")
        visual.load_state_dict(weights, assign=True)
        visual = visual.to(device)
        transform = clip_transform(visual)
    visual.requires_grad_(False).eval()
    return visual, transform


def clip_transform(visual: nn.Module) -> Callable:
    """open_clip's eval transform (PIL image -> tensor) for a vision tower built from a config."""
    import open_clip

    size = visual.image_size
    return open_clip.image_transform(size if isinstance(size, int) else size[0], is_train=False,
                                     mean=getattr(visual, "image_mean", None), std=getattr(visual, "image_std", None))


# --- model folders -----------------------------------------------------------------------------------------


def write_reason(e: BaseException) -> str:
    """The OS's words for a failed write: an OSError's, or the errno inside a SafetensorError (safetensors
    raises that, not OSError, on a full disk)."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    code = re.search(r"code: (\d+)", str(e))
    return os.strerror(int(code.group(1))) if code else (str(e).strip().splitlines() or [type(e).__name__])[0]


class WriteError(Lav2Error):
    """A file could not be written; `reason` is the OS's words, for callers that say more about what is lost."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write {path.name} in {path.parent} ({reason}); free space (or fix the "
                         f"permissions) there and run again")
        self.path, self.reason = path, reason


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(folder: Path, pattern: str) -> None:
    """Remove the `pattern` entries of `folder` (names ending in .partial-PID or .partial-PID-XXXX) whose process
    is gone: what kill -9 left of an interrupted write. Says so in one line on stderr."""
    removed = []
    for path in sorted(folder.glob(pattern)) if folder.is_dir() else ():
        pid = re.search(r"\.partial-(\d+)(-[^/]*)?$", path.name)
        if pid and int(pid.group(1)) != os.getpid() and not process_alive(int(pid.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        print(f"removed {len(removed)} partial folder(s) left in {folder} by killed runs: {', '.join(removed)}",
              file=sys.stderr)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Write a folder as a whole: into a hidden sibling named with this process's id (so a later run can tell a
    killed writer's leftovers from a live one's), renamed to `out` only when everything is written."""
    out = Path(out)
    if out.exists():
        raise Lav2Error(f"{out} already exists; choose another output folder or remove it first")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Lav2Error(f"cannot create the folder {out.parent} ({write_reason(e)}); choose another output folder") from None
    remove_stale_partials(out.parent, f".{out.name}.partial-*")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise WriteError(out, write_reason(e)) from None
    try:
        yield tmp
        tmp.rename(out)
    except (OSError, WriteError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.exists():  # another process made it meanwhile
            raise Lav2Error(f"{out} already exists (made by another process meanwhile); choose another output folder or "
                            f"remove it first") from None
        if isinstance(e, WriteError):  # named where the user looks: `out`, not the removed partial folder
            raise WriteError(out / e.path.name, e.reason) from None
        name = Path(e.filename).name if isinstance(e.filename, str) and e.filename.startswith(str(tmp)) else ""
        raise WriteError(out / name if name else out, write_reason(e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file as a whole: into a hidden sibling, renamed over `path` only once written."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """The one way lav2 writes tensors: a failed write (a full disk) is a WriteError, with no partial file left."""
    try:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, path)
    except (SafetensorError, OSError) as e:
        Path(path).unlink(missing_ok=True)
        raise WriteError(Path(path), write_reason(e)) from None


def save_torch(obj, path: Path) -> None:
    """torch.save (for optimizer states) through memory, then one plain write: a full disk is then a WriteError
    with the OS's reason, and no partial file (torch's own file writer raises a RuntimeError without one)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        Path(path).write_bytes(buffer.getbuffer())
    except OSError as e:
        Path(path).unlink(missing_ok=True)
        raise WriteError(Path(path), write_reason(e)) from None


def write_folder(out: Path, *, config: Config, layout: str, tokenizer: Path, base_weights=None, base: Optional[str] = None,
                 adapter=None, clip_spec: Optional[dict] = None, clip_weights=None, prompt_style: str = "chat",
                 source: Optional[dict] = None) -> None:
    """Write the files of a model folder into `out` (an existing, empty folder: see atomic_folder).
    base_weights: one state dict (model.safetensors), or an iterable of shards, each written and dropped before
    the next is made (model-00001.safetensors, ...), so that a 7B base never has to be in memory whole.
    clip_weights: a state dict, or a function that reads one; written first, so that a CLIP read by the function is
    gone before the first base shard is made."""
    if clip_weights is not None:
        save_tensors(clip_weights() if callable(clip_weights) else clip_weights, out / CLIP_FILE)
    weights = None
    if base_weights is not None:
        weights = []
        for i, shard in enumerate([base_weights] if isinstance(base_weights, dict) else base_weights, 1):
            weights.append(f"model-{i:05d}.safetensors")
            save_tensors(shard, out / weights[-1])
            del shard
        if len(weights) == 1:  # small enough for one file: the plain name
            os.replace(out / weights[0], out / WEIGHTS_FILE)
            weights = WEIGHTS_FILE
    if adapter:
        save_tensors(adapter, out / ADAPTER_FILE)
    shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    meta = dict(format="lav2", version=FORMAT_VERSION, layout=layout, config=config.to_dict(),
                weights=weights, base=base,
                adapter=ADAPTER_FILE if adapter else None, clip=clip_spec, prompt_style=prompt_style,
                source=source or {})
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def import_model(src: Path, out: Path, *, adapter: Optional[Path] = None, clip: Optional[Path] = None) -> Path:
    """Turn a Meta or Hugging Face LLaMA folder (plus optionally an official adapter .pth and a CLIP folder)
    into a lav2 model folder at `out`, written atomically."""
    src, out = Path(src), Path(out)
    source = find_source(src)
    Tokenizer(source.tokenizer)  # fail early on a broken tokenizer
    base_config, layout = source.config, "llama"
    base_state = read_base_weights(source)
    base_model = meta_model(base_config)
    check_state({k: torch.empty(shape, device="meta") for k, (shape, _) in base_state.items()},
                {k: v for k, v in base_model.state_dict().items() if k in base_state_names(base_model)}, f"{src}")
    config, adapter_state, prompt_style, clip_spec, clip_weights = base_config, None, "chat", None, None
    if adapter is not None:
        adapter = Path(adapter)
        if not adapter.is_file():
            raise Lav2Error(f"{adapter}: no such adapter file")
        checkpoint = read_torch_file(adapter)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise Lav2Error(f"{adapter}: not an official LLaMA-Adapter checkpoint (expected {{'model': ..., 'config': ...}})")
        layout, config = official_layout(checkpoint["model"], checkpoint.get("config") or {}, adapter.name, base_config)
        adapter_state = official_to_lav2(checkpoint["model"], config)
        check_state(adapter_state, adapter_state_dict(meta_model(config)), f"{adapter}")
        prompt_style = "alpaca"
        clip_spec = DEFAULT_CLIP
    if clip is not None:
        clip_config, clip_file, visual = inspect_clip_folder(Path(clip))
        clip_spec = {"config": clip_config, "weights": CLIP_FILE}
        if visual["visual.proj"].shape[1] != config.clip_dim:
            raise Lav2Error(f"{clip}: CLIP output width {visual['visual.proj'].shape[1]} != the adapter's "
                            f"clip_dim {config.clip_dim}; use the CLIP the adapter was trained with")
        clip_weights = functools.partial(read_clip_visual, clip_file, set(visual))  # read when written
    with atomic_folder(out) as tmp:
        base_weights = shards((key, read()) for key, (_, read) in base_state.items())  # read as written
        write_folder(tmp, config=config, layout=layout, tokenizer=source.tokenizer, base_weights=base_weights,
                     adapter=adapter_state, clip_spec=clip_spec, clip_weights=clip_weights, prompt_style=prompt_style,
                     source=dict(base=str(src.resolve()), adapter=str(adapter.resolve()) if adapter else None))
    return out


@dataclass
class Loaded:
    """What lav2.load returns: the model and what it needs to be used."""

    model: LLaMAAdapter
    tokenizer: Tokenizer
    preprocess: Optional[Preprocess]  # PIL image -> (3, H, W) tensor, channel order as the layout expects
    config: Config
    folder: Path
    info: dict  # the folder's lav2.json
    clip_spec: Optional[dict] = None  # the CLIP the folder (or a base it builds on) names; None: none named
    memory_note: Optional[str] = None  # why the dtype differs from the one asked for (memory.plan_inference)


# lav2.json's fields: the JSON types each may have, and whether it must be there
FOLDER_FIELDS = {
    "format": ((str,), True), "version": ((int,), True), "config": ((dict,), True), "layout": ((str,), False),
    "weights": ((str, list, type(None)), False), "base": ((str, type(None)), False),
    "adapter": ((str, type(None)), False), "clip": ((dict, type(None)), False),
    "prompt_style": ((str,), False), "source": ((dict,), False),
}
JSON_NAMES = {dict: "an object", str: "a string", int: "an integer", list: "a list of file names", type(None): "null"}


def read_folder_info(folder: Path) -> dict:
    """A model folder's lav2.json, checked field by field, so that every command that reads a folder fails the
    same way: one line naming the file, the field and what it should be."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file, not a model folder" if folder.exists() else "no such model folder"
        raise Lav2Error(f"{folder}: {what}; `lav2 download` makes one")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise Lav2Error(f"{folder}: not a lav2 model folder (no {CONFIG_FILE}); import weights with "
                        f"`lav2 download PATH --out DIR`")
    info = read_json(path)

    def bad(what: str) -> Lav2Error:
        return Lav2Error(f"{path}: {what}; the folder is damaged: make it again with `lav2 download`, "
                         f"`lav2 finetune` or `lav2 merge`")

    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, found a {type(info).__name__}")
    if info.get("format") != "lav2" or info.get("version") != FORMAT_VERSION:
        raise bad(f"not a lav2 v{FORMAT_VERSION} model config (format {info.get('format')!r}, "
                  f"version {info.get('version')!r})")
    for key, (types, required) in FOLDER_FIELDS.items():
        if key not in info:
            if required:
                raise bad(f"the field {key!r} is missing")
        elif not isinstance(info[key], types) or isinstance(info[key], bool):
            raise bad(f"the field {key!r} must be {' or '.join(JSON_NAMES[t] for t in types)}, not {info[key]!r}")
    clip = info.get("clip")
    if clip is not None and not (isinstance(clip.get("name"), str) or (
            isinstance(clip.get("config"), dict) and isinstance(clip.get("weights"), str))):
        raise bad('the field \'clip\' must be {"name": ..., "pretrained": ...} or {"config": {...}, "weights": FILE}')
    if info.get("prompt_style", "chat") not in STYLES:
        raise bad(f"the field 'prompt_style' must be one of {', '.join(STYLES)}, not {info['prompt_style']!r}")
    config_types = {f.name: f.type for f in fields(Config)}  # strings: model.py postpones its annotations
    for key, value in info["config"].items():
        if key in config_types and not json_fits(config_types[key], value):
            raise bad(f"config.{key} must be {config_types[key]}, not {value!r}")
    try:
        Config.from_dict(info["config"])
    except (TypeError, ValueError) as e:
        raise bad(f"bad model config ({e})") from None
    for key in ("weights", "adapter"):
        names = named_files(info, key)
        if not all(isinstance(name, str) for name in names):
            raise bad(f"the field {key!r} must name files, not {info[key]!r}")
        for name in names:
            if not (folder / name).is_file():
                raise Lav2Error(f"{folder}: {CONFIG_FILE} names the {key} file {name!r}, which is missing; the "
                                f"folder is incomplete: make it again")
    return info


def json_fits(annotation: str, value) -> bool:
    """Whether a JSON value fits one of Config's annotations (int, float, str, bool, tuple[str, ...], Optional)."""
    if annotation.startswith("Optional["):
        return value is None or json_fits(annotation[len("Optional["):-1], value)
    if annotation == "tuple[str, ...]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"int": int, "str": str}[annotation]) and not isinstance(value, bool)


def named_files(info: dict, key: str) -> list:
    """The file names a lav2.json field holds ("weights": one name or a list of shards; "adapter": one name)."""
    names = info.get(key) or []
    return [names] if isinstance(names, str) else names


def base_folder(folder: Path, info: dict) -> Optional[Path]:
    return None if not info.get("base") else (folder / info["base"]).resolve()


def weight_files(folder: Path, info: dict) -> tuple[list[Path], Optional[dict], Path]:
    """The safetensors files of a folder's model, base first (following "base" links), its adapter last; the
    CLIP spec and the folder its weights are in."""
    files, clip_spec, clip_folder = [], info.get("clip"), folder
    parent = base_folder(folder, info)
    if parent is not None:
        if not parent.is_dir():
            raise Lav2Error(f"{folder}: builds on the base folder {parent}, which is missing; put it back where "
                            f"{folder / CONFIG_FILE} says ('base')")
        files, parent_clip, parent_clip_folder = weight_files(parent, read_folder_info(parent))
        if clip_spec is None:
            clip_spec, clip_folder = parent_clip, parent_clip_folder
    files += [folder / name for key in ("weights", "adapter") for name in named_files(info, key)]
    return files, clip_spec, clip_folder


def tensor_shapes(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor's shape, read from the files' headers only, as meta tensors (for check_state)."""
    shapes = {}
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                shapes.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise Lav2Error(f"{path}: cannot read as safetensors ({e}); the file may be truncated: download it "
                            f"again") from None
    return shapes


def tensor_dtypes(files: list[Path], keys: set[str]) -> dict[str, torch.dtype]:
    """The stored dtype of some tensors, from the files' headers."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    found = {}
    for path in files:
        with safe_open(path, "pt") as f:
            found.update({k: names.get(f.get_slice(k).get_dtype(), torch.float32) for k in f.keys() if k in keys})
    return found


def read_tensors(files: list[Path], device="cpu", only: Optional[set[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The files' tensors one at a time (a later file's tensor of the same name wins, as with dict.update);
    only: read just these keys."""
    last = {}
    for i, path in enumerate(files):
        try:
            with safe_open(path, "pt") as f:
                last.update({k: i for k in f.keys()})
        except (SafetensorError, OSError):
            pass  # tensor_shapes has said what is wrong with it
    for i, path in enumerate(files):
        try:
            with safe_open(path, "pt", device=str(device)) as f:
                for key in f.keys():
                    if last[key] == i and (only is None or key in only):
                        yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise Lav2Error(f"{path}: cannot read as safetensors ({e}); the file may be truncated: download it "
                            f"again") from None


def effective_clip(folder: Path, info: dict) -> Optional[dict]:
    """The CLIP spec in force for a folder: its own, else that of the base it builds on."""
    if info.get("clip") is not None:
        return info["clip"]
    parent = base_folder(folder, info)
    return None if parent is None or not parent.is_dir() else effective_clip(parent, read_folder_info(parent))


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_device(device: Optional[str]) -> torch.device:
    """A torch.device for a user's string (default: cuda when there is one); a malformed or absent device is
    one line."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise Lav2Error(f"device {device!r} is not one torch knows ({str(e).splitlines()[0]}); use cpu, cuda or "
                        f"cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise Lav2Error(f"device {device}: lav2 runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise Lav2Error(f"device {device}: no such CUDA GPU is visible to torch ({torch.cuda.device_count()} "
                        f"visible); use cpu, or check the driver and CUDA_VISIBLE_DEVICES")
    return dev


@torch.no_grad()
def init_adapters_(model: LLaMAAdapter, *, device, seed: int) -> None:
    """Give every tensor still on the meta device (after the base weights were assigned: the adapter's) its
    initial value from `seed`, on `device`, in float32: the model then equals its base exactly."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in model.modules():
            meta = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_meta]
            for name, p in meta:
                setattr(module, name, nn.Parameter(torch.empty(p.shape, device=device), requires_grad=p.requires_grad))
            if meta and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # every reset_parameters touches only adapter tensors
    finally:
        torch.random.set_rng_state(generator_state)


def with_layout(base: Config, layout: Config) -> Config:
    """The LLaMA dims of `base` with the adapter switches of `layout` (a preset made for another size)."""
    base_fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                   "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")
    layers = dict(adapter_layers=min(layout.adapter_layers, base.n_layers),
                  visual_layers=min(layout.visual_layers, base.n_layers))
    if layout.fusion == "add" and layout.adapter_layers == layout.n_layers - 1:
        layers["adapter_layers"] = base.n_layers - 1  # the release's "all but the first layer"
    if layout.fusion == "early" and layout.visual_len:
        layers["adapter_layers"] = min(layers["adapter_layers"], base.n_layers - layers["visual_layers"])
    return replace(layout, **{f: getattr(base, f) for f in base_fields}, **layers)


QUANTIZE = ("int8", "8bit")


def assign_(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in the model where state dict key `key` points (as load_state_dict(assign=True) does, one
    tensor at a time)."""
    prefix, _, name = key.rpartition(".")
    module = model.get_submodule(prefix)
    if name in module._parameters:
        setattr(module, name, nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad))
    else:
        module._buffers[name] = tensor


def model_config(folder: Path, *, layout: Optional[str] = None) -> tuple[dict, Config]:
    """A folder's lav2.json and its model config; with `layout`, the base's LLaMA with that preset's adapter
    (the folder must then be a plain base)."""
    info = read_folder_info(folder)
    config = Config.from_dict(info["config"])
    if layout is None:
        return info, config
    if info.get("adapter"):
        raise Lav2Error(f"{folder}: is a fine-tuned model folder; give the plain LLaMA folder it builds on "
                        f"(its lav2.json 'base') as the recipe's base")
    try:
        return info, with_layout(config, Config.from_name(layout))
    except (KeyError, ValueError) as e:
        raise Lav2Error(f"layout {layout} does not fit the base {folder} ({e})") from None


def load(path, device=None, dtype=None, *, quantize: Optional[str] = None, layout: Optional[str] = None,
         seed: int = 0) -> Loaded:
    """Build the model of a lav2 folder: the one way from a folder to a model, for chat, eval, serve, fine-tuning
    and bench. Every load is strict: each tensor the model has must be in the files, with its shape, and no other.

    Inference (the default): everything from the folder, frozen, eval mode, in `dtype` (default: bfloat16 on
    CUDA, float32 on CPU); quantize "int8" stores the frozen matrices in int8 (bitsandbytes on CUDA, weight-only
    on the CPU); float32 CPU matrices get the decode layout (fastpath.py).
    Fine-tuning (`layout`, a preset name): the folder must be a plain base; its LLaMA gets that preset's adapter,
    initialised from `seed`, float32 and trainable, the frozen base in `dtype` (quantize "8bit": bitsandbytes).
    """
    folder = Path(path)
    info, config = model_config(folder, layout=layout)
    device = pick_device(device)
    if quantize not in (None, *QUANTIZE):
        raise Lav2Error(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    note = None
    if layout is None:  # inference: load what fits (training checks its own, larger, need: finetune)
        plan = memory.plan_inference(config, device, dtype=dtype, quantize=quantize, default_dtype=default_dtype(device),
                                     clip_params=clip_params(effective_clip(folder, info)) if config.visual_len else 0)
        dtype, quantize, note = plan.dtype, plan.quantize, plan.note
    dtype = dtype or default_dtype(device)
    files, clip_spec, clip_folder = weight_files(folder, info)
    model = meta_model(config)  # no CLIP yet: its weights load below
    expected = model.state_dict()
    if layout is not None:  # the base's tensors only: the adapter is made below
        base = base_state_names(model)
        expected = {k: v for k, v in expected.items() if k in base}
    check_state(tensor_shapes(files), expected, f"{folder}")
    kind = "8bit" if quantize == "8bit" or (quantize == "int8" and device.type == "cuda") else quantize
    if kind == "int8" and layout is not None:
        raise Lav2Error("int8 weight-only matrices are for inference; train with load_in_8bit (bitsandbytes)")
    if kind == "8bit":
        fastpath.require_bitsandbytes()
    for key, tensor in read_tensors(files, device):  # one tensor at a time, straight onto the device
        trainable_norm = layout is not None and key.endswith("norm.weight")  # trained in float32
        tensor = tensor.to(torch.float32 if trainable_norm else dtype)
        assign_(model, key, tensor)
        # Quantized as it arrives: a big model is never in memory at full precision. What is kept as read gets a
        # copy of its own: a tensor read from a safetensors file may be a view of the file's memory map, which
        # would keep every page of the file that quantizing read resident.
        if kind and not fastpath.quantize_loaded_(model, key, kind):
            assign_(model, key, tensor.clone())
    if layout is not None:
        init_adapters_(model, device=device, seed=seed)
    model.init_rope(device)
    preprocess = None
    if config.visual_len:
        if clip_spec is None and (layout is None or config.clip_dim != DEFAULT_CLIP_DIM):
            raise Lav2Error(f"{folder}: names no CLIP and the model needs a {config.clip_dim}-wide one; import the "
                            f"base with `lav2 download ... --clip DIR`")
        model.visual.clip, transform = load_clip(clip_spec or DEFAULT_CLIP, clip_folder, device)
        model.visual.clip.to(dtype)
        preprocess = make_preprocess(transform, bgr=config.bgr)
    if layout is None:
        model.requires_grad_(False).eval()
        if not kind:
            fastpath.store_for_decoding_(model)
    else:
        mark_trainable(model)
    tokenizer = Tokenizer(folder / TOKENIZER_FILE)
    return Loaded(model=model, tokenizer=tokenizer, preprocess=preprocess, config=config, folder=folder, info=info,
                  clip_spec=clip_spec, memory_note=note)


# --- merge -------------------------------------------------------------------------------------------------



def merge(run_dir, *, out, dtype: Optional[str] = None) -> Path:
    """Fold every scale and LoRA of a model folder into its base matrices and write one self-contained folder:
    the folded base, and an adapter file with what cannot fold (prompts, gates, biases, norms, visual branch).
    Works tensor by tensor on the state dicts, so a 7B merge needs no float32 copy of the model."""
    run_dir, out = Path(run_dir), Path(out)
    info = read_folder_info(run_dir)
    config = Config.from_dict(info["config"])
    files, clip_spec, clip_folder = weight_files(run_dir, info)
    model = meta_model(config)
    check_state(tensor_shapes(files), {k: v for k, v in model.state_dict().items() if not k.startswith("visual.clip.")},
                f"{run_dir}")
    merged = merged_config(config)
    base_names = base_state_names(meta_model(merged))
    small = dict(read_tensors(files, only=set(model.state_dict()) - base_names))  # the adapter and the norms
    base_dtype = DTYPES[dtype] if dtype else next(iter(tensor_dtypes(files, {"tok_embeddings.weight"}).values()))
    linears = {name: name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, AdapterLinear)}

    def folded() -> Iterator[tuple[str, torch.Tensor]]:  # the base matrices one at a time, folded as they come
        for key, tensor in read_tensors(files, only=base_names):
            name = key.removesuffix(".weight")
            if name in linears:
                foldable = ("scale",) + (() if linears[name] in merged.lora_targets else ("lora_a", "lora_b"))
                extras = {p: small.pop(f"{name}.{p}", None) for p in foldable}
                tensor, bias = fold_linear(tensor, small.get(f"{name}.bias"), **extras)
                if bias is not None:
                    small[f"{name}.bias"] = bias
            yield key, tensor.to(base_dtype)

    adapter = small  # what folding leaves (prompts, gates, biases, norms, visual branch), once the base is written
    clip_weights = None
    if clip_spec is not None and "weights" in clip_spec:
        clip_weights = functools.partial(read_safetensors, clip_folder / clip_spec["weights"])  # read when written
        clip_spec = {**clip_spec, "weights": CLIP_FILE}
    with atomic_folder(out) as tmp:
        write_folder(tmp, config=merged, layout=info.get("layout", "llama"), tokenizer=run_dir / TOKENIZER_FILE,
                     base_weights=shards(folded()), adapter=adapter, clip_spec=clip_spec, clip_weights=clip_weights,
                     prompt_style=info.get("prompt_style", "chat"), source=dict(merged_from=str(run_dir.resolve())))
    return out
