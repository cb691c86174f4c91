"""lav2: download, fine-tune, merge and chat with LLaMA-Adapter V2 on one GPU."""

__version__ = "0.1.0"


def load(path, device=None, dtype=None):
    """Load a lav2 model folder; returns an object with .model, .tokenizer, .preprocess, .config, .generate()."""
    from lav2.checkpoint import load as load_folder  # lazily: `lav2 --help` should not wait for torch

    return load_folder(path, device=device, dtype=dtype)
