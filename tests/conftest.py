"""Tiny, offline stand-ins for everything lav2 reads: tokenizer, LLaMA folders, CLIP, official checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lav2 import checkpoint, prompts
from lav2.model import Config, LLaMAAdapter, adapter_state_dict, base_parameter_names
from lav2.tokenizer import Tokenizer, train_tokenizer

TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWhat colour is the shape?\n\n### Response:\nRed.",
    "A red circle. A blue square. A green triangle. A yellow star. A purple circle. An orange square.",
    "What shape is it? A circle. The quick brown fox jumps over the lazy dog. Hello world, how are you?",
]

# open_clip.CLIP kwargs of a tiny ViT (32 px, 4x4 patches of 8 px, 2 blocks); output width 32
TINY_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread, and one thread does not stall when other processes load the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(TEXTS * 20, path, vocab_size=300)
    return path


def random_llama(config: Config, seed: int = 0) -> LLaMAAdapter:
    """A LLaMA with random weights; adapter tensors randomised too, so that tests see them act."""
    torch.manual_seed(seed)
    model = LLaMAAdapter(config)
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight") or name.endswith(".scale"):
            tensor.copy_(1 + 0.1 * torch.randn_like(tensor))
        elif not name.startswith("visual.clip."):
            tensor.normal_(0, 0.02 if name in base_parameter_names(model) else 0.1)
    return model


def write_meta_folder(folder: Path, model: LLaMAAdapter, tokenizer: Path, shards: int = 1) -> Path:
    """Meta's layout: params.json, consolidated.NN.pth split along the model-parallel dims, tokenizer.model."""
    folder.mkdir(parents=True)
    c = model.config
    (folder / "params.json").write_text(json.dumps(dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                                                        multiple_of=c.multiple_of, norm_eps=c.norm_eps, vocab_size=-1)))
    state = {k: v for k, v in model.state_dict().items() if k in base_parameter_names(model) or k.endswith("norm.weight")}
    for i in range(shards):
        shard = {}
        for key, tensor in state.items():
            dim = checkpoint.META_SHARD_DIM.get(key.split(".")[-2])
            shard[key] = tensor.clone() if dim is None or key.endswith("norm.weight") else tensor.chunk(shards, dim)[i].clone()
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


def write_clip_folder(folder: Path, seed: int = 0) -> Path:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    clip = open_clip.CLIP(**TINY_CLIP)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def lav2_to_official(model: LLaMAAdapter) -> dict[str, torch.Tensor]:
    """The inverse of checkpoint.official_to_lav2, written independently here: the release's key names."""
    out = {}
    for key, tensor in adapter_state_dict(model).items():
        if key == "adapter_query":
            out["adapter_query.weight"] = tensor.reshape(-1, tensor.shape[-1])
        elif key == "visual.visual_query":
            out["visual_query.weight"] = tensor
        elif key.startswith("visual."):
            out[key[len("visual."):]] = tensor
        elif key.endswith((".lora_a", ".lora_b")):
            parent, linear, lora = key.rsplit(".", 2)
            out[f"llama.{parent}.lora_{linear}_l{1 if lora == 'lora_a' else 2}.weight"] = tensor
        else:
            out[f"llama.{key}"] = tensor
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer_path):
    """(meta folder, lav2 folder, model) of a tiny random LLaMA."""
    root = tmp_path_factory.mktemp("base")
    model = random_llama(Config.from_name("tiny"))
    meta = write_meta_folder(root / "meta", model, tokenizer_path)
    folder = checkpoint.import_model(meta, root / "lav2")
    return meta, folder, model


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    return write_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory, tiny_base, clip_folder):
    """An official-format BIAS checkpoint made from a tiny model, imported over the tiny base: (pth, folder)."""
    root = tmp_path_factory.mktemp("official")
    meta, _, base = tiny_base
    model = random_llama(Config.from_name("tiny-official"), seed=1)
    model.load_state_dict({k: v for k, v in base.state_dict().items()}, strict=False)
    pth = root / "0000_BIAS-7B.pth"
    torch.save({"model": lav2_to_official(model), "config": {"w_bias": True, "w_lora": False, "lora_rank": 16}}, pth)
    return pth, checkpoint.import_model(meta, root / "lav2", adapter=pth, clip=clip_folder)


def make_image(path: Path, colour=(200, 30, 30), size: int = 48) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=colour)
    image.save(path)
    return path


# --- data tests: a tokenizer that knows the templates and the example files, a tiny transform ----------------

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "recipes" / "examples"


@pytest.fixture(scope="session")
def data_tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [prompts.ALPACA_WITH_INPUT, prompts.ALPACA_NO_INPUT, prompts.CHAT_SYSTEM, prompts.CHAT_TURN]
    texts += [line for f in sorted(EXAMPLES.glob("*.json*")) for line in f.read_text().splitlines()]
    return train_tokenizer(texts * 5, tmp_path_factory.mktemp("data_tok") / "tokenizer.model", vocab_size=400)


def _to_tensor(image: Image.Image, size: int = 32) -> torch.Tensor:
    """A stand-in for open_clip's transform: resize, then (3, H, W) floats in 0..1."""
    image = image.resize((size, size))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1) / 255


@pytest.fixture(scope="session")
def preprocess():
    return _to_tensor
