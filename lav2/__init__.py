"""lav2: download, fine-tune, merge and chat with LLaMA-Adapter V2 on one GPU."""

__version__ = "0.1.0"


def load(path, device=None, dtype=None, *, quantize=None):
    """Load a lav2 model folder; returns an object with .model, .tokenizer, .preprocess, .config, .generate().
    quantize="int8": the frozen matrices in int8 (bitsandbytes on CUDA, weight-only on the CPU)."""
    from lav2.checkpoint import load as load_folder  # lazily: `lav2 --help` should not wait for torch
    from lav2.generate import Model

    return Model(**vars(load_folder(path, device=device, dtype=dtype, quantize=quantize)))
