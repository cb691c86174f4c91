"""Expert models (the paper's "integration of expert models"): text about the image, added to the prompt
without any training. The caption expert is open_clip's CoCa ViT-L/14 fine-tuned on MS-COCO; the OCR expert is
Tesseract. `describe` turns their outputs into the context that the chat gives the model with the image.

    --expert caption           CoCa weights from the Hugging Face hub (network once, then its cache)
    --expert caption=FILE      CoCa weights from a local open_clip checkpoint (.bin, .pt or .safetensors)
    --expert ocr               needs `pip install pytesseract` and `apt-get install tesseract-ocr`
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence

import torch

from lav2.errors import Lav2Error

if TYPE_CHECKING:
    from PIL import Image

COCA_MODEL, COCA_PRETRAINED = "coca_ViT-L-14", "mscoco_finetuned_laion2B-s13B-b90k"
EXPERTS = ("caption", "ocr")
SOT, EOT = 49406, 49407  # open_clip's BPE start and end of text


class Expert(Protocol):
    label: str  # how the expert's text is introduced in the prompt

    def __call__(self, image: "Image.Image") -> str: ...


class CaptionExpert:
    """A caption from an open_clip CoCa model, decoded greedily.

    Greedy, not open_clip's `CoCa.generate`: that needs transformers' BeamSearchScorer, which transformers 5
    removed; a caption of at most `max_tokens` BPE tokens by argmax is a short loop over CoCa's own forward.
    """

    label = "Image caption"

    def __init__(self, model: torch.nn.Module, transform: Callable, *, max_tokens: int = 30):
        self.model, self.transform, self.max_tokens = model.eval(), transform, max_tokens

    @classmethod
    def load(cls, pretrained: str = COCA_PRETRAINED, device=None) -> "CaptionExpert":
        """The released CoCa: `pretrained` is open_clip's tag (downloaded once) or a local weights file."""
        import open_clip

        local = Path(pretrained).expanduser()
        if pretrained != COCA_PRETRAINED and not local.is_file():
            raise Lav2Error(f"caption expert: {local}: no such CoCa weights file; give the open_clip checkpoint of "
                            f"{COCA_MODEL} ({COCA_PRETRAINED}), or plain `--expert caption` to download it")
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                COCA_MODEL, pretrained=str(local) if local.is_file() else pretrained, device=device)
        except Exception as e:  # hub, network and file errors come in many types
            raise Lav2Error(f"caption expert: could not load CoCa {COCA_MODEL}/{COCA_PRETRAINED} "
                            f"({str(e).splitlines()[0][:200]}); it downloads once from the Hugging Face hub (about "
                            f"2.5 GB, needs network), or give a local file: --expert caption=PATH") from None
        return cls(model, transform)

    @torch.no_grad()
    def __call__(self, image: "Image.Image") -> str:
        import open_clip

        device = next(self.model.parameters()).device
        pixels = self.transform(image.convert("RGB"))[None].to(device)
        encoded = self.model(pixels)  # image only: {"image_features", "image_embs"}
        text = torch.tensor([[SOT]], device=device)
        for step in range(self.max_tokens):
            logits = self.model(pixels, text, image_latent=encoded["image_features"], image_embs=encoded["image_embs"],
                                output_labels=False)["logits"][0, -1]
            if step == 0:
                logits[EOT] = float("-inf")  # a caption has at least one word
            token = logits.argmax()
            if int(token) == EOT:
                break
            text = torch.cat([text, token.view(1, 1)], dim=1)
        return " ".join(open_clip.decode(text[0, 1:]).split())


class OcrExpert:
    """The text in the image, read by Tesseract through pytesseract, as one line."""

    label = "Text in the image"

    def __init__(self, lang: str = "eng"):
        try:
            import pytesseract
        except ImportError:
            raise Lav2Error("the OCR expert needs pytesseract and Tesseract: pip install pytesseract; "
                            "apt-get install tesseract-ocr (macOS: brew install tesseract)") from None
        try:
            pytesseract.get_tesseract_version()
        except pytesseract.TesseractNotFoundError:
            raise Lav2Error("the OCR expert needs the Tesseract program, which is not installed or not on PATH: "
                            "apt-get install tesseract-ocr (macOS: brew install tesseract)") from None
        self.pytesseract, self.lang = pytesseract, lang

    def __call__(self, image: "Image.Image") -> str:
        return " ".join(self.pytesseract.image_to_string(image.convert("RGB"), lang=self.lang).split())


def load_experts(specs: Sequence[str], device=None) -> list[Expert]:
    """Experts from their command-line specs: "caption", "caption=FILE", "ocr"."""
    experts: list[Expert] = []
    for spec in dict.fromkeys(specs):  # each once, in the order given
        name, _, arg = spec.partition("=")
        if name == "caption":
            experts.append(CaptionExpert.load(arg or COCA_PRETRAINED, device=device))
        elif name == "ocr" and not arg:
            experts.append(OcrExpert())
        else:
            raise Lav2Error(f"unknown expert {spec!r}: choose caption, caption=FILE or ocr")
    return experts


def describe(experts: Sequence[Expert], image: "Image.Image") -> Optional[str]:
    """What the experts say about the image, one "label: text" line each; None when they say nothing."""
    lines = [f"{expert.label}: {text}" for expert in experts if (text := expert(image))]
    return "\n".join(lines) or None
