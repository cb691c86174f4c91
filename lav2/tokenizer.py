"""SentencePiece tokenizer with LLaMA's special ids (unk 0, bos 1, eos 2)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from lav2.errors import Lav2Error


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise Lav2Error(f"tokenizer not found: {path} (a SentencePiece tokenizer.model is needed there)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise Lav2Error(f"{path} is not a SentencePiece model ({e}); use the tokenizer.model that came with the weights") from None
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # LLaMA's tokenizer has no pad piece (pad_id() is -1): pad with eos, and mask padding by length.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.vocab_size: int = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(int(token_id))


def train_tokenizer(texts: list[str], out_path: str | Path, vocab_size: int = 256) -> Tokenizer:
    """Train a small LLaMA-style SentencePiece model (BPE, byte fallback) on `texts`; for tests and the demo."""
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    Path(out_path).write_bytes(model.getvalue())
    return Tokenizer(out_path)
