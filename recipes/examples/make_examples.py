"""Write the tiny example data of every format (and its images) next to this script.

    python recipes/examples/make_examples.py

The files are committed; this script is how they were made, and how to remake them after a format change.
Images are drawn with Pillow in several modes (RGB, P, RGBA, L) because the loader must take them all.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# (file name, Pillow mode, shape, colour, caption)
IMAGES = [
    ("red_circle.png", "RGB", "circle", (220, 30, 30), "A red circle on a white background."),
    ("blue_square.png", "P", "square", (30, 60, 220), "A blue square in the middle of a white picture."),
    ("green_triangle.png", "RGBA", "triangle", (30, 170, 60), "A green triangle pointing up."),
    ("gray_circle.png", "L", "circle", (90, 90, 90), "A dark gray circle on white."),
]

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet. 2. Exercise regularly. 3. Sleep at least seven hours."},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps.",
     "output": "Le chat dort."},
    {"instruction": "What shape is in the picture?", "input": "", "output": "A red circle.",
     "image": "images/red_circle.png"},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
]

LLAVA = [
    {"id": "0", "image": "images/blue_square.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "The shape is blue."},
        {"from": "human", "value": "And what shape is it?"},
        {"from": "gpt", "value": "It is a square."}]},
    {"id": "1", "image": "images/green_triangle.png", "conversations": [
        {"from": "human", "value": "Describe the image.\n<image>"},
        {"from": "gpt", "value": "A green triangle on a white background."}]},
    {"id": "2", "conversations": [
        {"from": "human", "value": "Name a primary colour."},
        {"from": "gpt", "value": "Red."}]},
]


def draw(mode: str, shape: str, colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = (6, 6, size - 7, size - 7)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(size // 2, 5), (size - 6, size - 6), (5, size - 6)], fill=colour)
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return image.convert(mode)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    for name, mode, shape, colour, _ in IMAGES:
        draw(mode, shape, colour).save(HERE / "images" / name, optimize=True)
    write_json(HERE / "alpaca.json", ALPACA)
    write_jsonl(HERE / "alpaca.jsonl", ALPACA)
    write_json(HERE / "llava.json", LLAVA)
    captions = [{"image": f"images/{name}", "caption": caption} for name, _, _, _, caption in IMAGES]
    write_json(HERE / "captions.json", captions)
    write_jsonl(HERE / "captions.jsonl", captions)
    # COCO captions as published: images + annotations, several captions per image, image ids not 0..n.
    coco = {"info": {"description": "lav2 example in the COCO captions format"},
            "images": [{"id": 100 + i, "file_name": name, "width": 32, "height": 32}
                       for i, (name, *_) in enumerate(IMAGES)],
            "annotations": [{"id": 1000 + i, "image_id": 100 + i % len(IMAGES), "caption": text}
                            for i, text in enumerate([c for *_, c in IMAGES] + [
                                "A circle.", "A square shape.", "A triangle.", "Something gray."])]}
    write_json(HERE / "coco_captions.json", coco)


if __name__ == "__main__":
    main()
