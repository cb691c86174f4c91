"""Expert models: Tesseract OCR for real, and the CoCa caption plumbing with a tiny random CoCa."""

from __future__ import annotations

import pytest
import torch

from lav2.errors import Lav2Error
from lav2.experts import CaptionExpert, OcrExpert, describe, load_experts

# open_clip.CoCa kwargs in the shape of model_configs/coca_ViT-L-14.json, tiny: 32 px, one block per tower;
# the real BPE vocabulary so that open_clip.decode reads the ids
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
}


def text_image(text: str):
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (60 + 26 * len(text), 90), "white")
    ImageDraw.Draw(image).text((30, 20), text, fill="black", font=ImageFont.load_default(size=40))
    return image


def tiny_caption_expert() -> CaptionExpert:
    import open_clip

    torch.manual_seed(0)
    return CaptionExpert(open_clip.CoCa(**TINY_COCA), open_clip.image_transform(32, is_train=False), max_tokens=8)


def test_ocr_expert_reads_a_rendered_line_with_tesseract():
    assert OcrExpert()(text_image("HELLO WORLD 42")) == "HELLO WORLD 42"


def test_caption_expert_decodes_a_caption_with_a_tiny_coca():
    caption = tiny_caption_expert()(text_image("x"))
    assert isinstance(caption, str) and caption  # random weights: some words, at most 8 BPE tokens
    assert "<" not in caption  # no start/end markers


def test_describe_labels_each_expert_and_says_nothing_when_they_do_not():
    ocr, caption = OcrExpert(), tiny_caption_expert()
    lines = describe([caption, ocr], text_image("STOP")).splitlines()
    assert lines[0].startswith("Image caption: ") and lines[1] == "Text in the image: STOP"
    from PIL import Image

    assert describe([ocr], Image.new("RGB", (64, 64), "white")) is None


def test_missing_tesseract_is_one_line_on_how_to_install_it(monkeypatch):
    import pytesseract

    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    with pytest.raises(Lav2Error, match="apt-get install tesseract-ocr"):
        OcrExpert()


def test_missing_coca_weights_and_unknown_experts_are_clear_errors(tmp_path):
    with pytest.raises(Lav2Error, match="no such CoCa weights file"):
        load_experts([f"caption={tmp_path / 'coca.bin'}"])
    with pytest.raises(Lav2Error, match="unknown expert 'vqa'"):
        load_experts(["vqa"])
