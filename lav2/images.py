"""Images in: open a file as the photo it shows, and preprocess it the way a model's CLIP expects.

Both training data and chat go through `open_image`, so a model sees the same pixels in both. Phones store the
camera's orientation in the JPEG EXIF tag rather than in the pixels; the official code's cv2.imread applies it,
and so do we. Any Pillow mode (P, RGBA, L, I;16, CMYK, ...) becomes RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lav2.errors import Lav2Error

Preprocess = Callable[[Image.Image], torch.Tensor]
ImageLike = Union[str, Path, Image.Image]


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) and RGB; transparent pixels over white rather than black."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(image: ImageLike) -> Image.Image:
    """A PIL image, or a file read into one (upright RGB); a missing, non-image or corrupt file is a Lav2Error."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image).expanduser()
    if not path.is_file():
        raise Lav2Error(f"{path}: no such image file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not inside the model
            return to_rgb(opened)
    except UnidentifiedImageError:
        raise Lav2Error(f"{path}: not an image Pillow can read; give a JPEG, PNG, WebP or similar file") from None
    except Image.DecompressionBombError as e:
        raise Lav2Error(f"{path}: the image is too large to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise Lav2Error(f"{path}: the image is corrupt or truncated ({e})") from None


def make_preprocess(transform: Callable, *, bgr: bool) -> Preprocess:
    """PIL image (any mode) -> tensor by the CLIP transform; BGR layouts swap the channels first, as
    cv2.imread fed the official release."""

    def preprocess(image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        if bgr:
            image = Image.merge("RGB", image.split()[::-1])
        return transform(image)

    return preprocess


def load_image(image: ImageLike, preprocess: Preprocess) -> torch.Tensor:
    """open_image, then the model's transform: a (3, H, W) tensor."""
    return preprocess(open_image(image))
