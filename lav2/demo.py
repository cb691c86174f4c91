"""The offline demo of recipes/shapes.yaml: everything generated locally from the recipe's seed, then evaluated.

`generate` writes, inside the run's output folder:

    base/      a lav2 base folder: a tiny random LLaMA (frozen, like any base), a tiny random open_clip ViT
               (frozen) and a SentencePiece model trained on the demo's texts
    data/      images of one shape (circle, square, triangle, star) in one of six colours at a random place and
               size on a plain light or dark background; captions.jsonl ("A red circle."), instructions.jsonl
               ("What colour is the shape?" -> "Red.", "What shape is it?" -> "A circle.", a few text-only)
    heldout/   100 more images drawn with another seed (0.png, 1.png, ...) and heldout.jsonl with their answers

`materialise` points the recipe at them; `evaluate` asks both questions about every held-out image (greedy
decoding with generate.py) and scores whether the answer names the right colour / shape.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import torch

from lav2 import checkpoint
from lav2.data import encode_prompt
from lav2.errors import Lav2Error
from lav2.generate import generate as generate_tokens  # this module has its own generate (the data)
from lav2.model import Config, LLaMAAdapter, base_parameter_names
from lav2.prompts import ALPACA_NO_INPUT, CAPTION_INSTRUCTION, CHAT_SYSTEM, CHAT_TURN, Turn
from lav2.recipe import Recipe, Source
from lav2.tokenizer import train_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "purple": (140, 50, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "star")
COLOUR_QUESTION, SHAPE_QUESTION = "What colour is the shape?", "What shape is it?"
MAX_ANSWER_TOKENS = 8  # "A triangle." is 4 tokens with eos
TEXT_ONLY = [
    ("How many sides does a triangle have?", "Three."),
    ("How many sides does a square have?", "Four."),
    ("How many points does a star have?", "Five."),
    ("Is a circle round?", "Yes, a circle is round."),
    ("Which colour do red and yellow make?", "Orange."),
    ("Which colour do blue and yellow make?", "Green."),
    ("Which colour do red and blue make?", "Purple."),
    ("Name the colours you know.", "Red, green, blue, yellow, purple and orange."),
    ("Name the shapes you know.", "Circle, square, triangle and star."),
    ("Say hello.", "Hello!"),
]

# base: {demo: {...}}: the tiny LLaMA and CLIP (vocab_size is the tokenizer's, found after training it)
BASE_DEFAULTS = dict(dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=256, vocab_size=1000,
                     clip={"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 16,
                           "embed_dim": 32})
# generate_data: {...}
DATA_DEFAULTS = dict(seed=0, images=2000, heldout=100, heldout_seed=1, image_size=64, text_only_repeat=20)


def settings(given: dict, defaults: dict, where: str) -> dict:
    """defaults updated by `given`; unknown keys and wrong types are one-line errors."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise Lav2Error(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(defaults)}")
    out = dict(defaults)
    for key, value in given.items():
        if isinstance(defaults[key], dict):
            out[key] = settings(value if isinstance(value, dict) else {}, defaults[key], f"{where}.{key}")
            if not isinstance(value, dict):
                raise Lav2Error(f"{where}.{key} must be a mapping, not {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Lav2Error(f"{where}.{key} must be a non-negative integer, not {value!r}")
        else:
            out[key] = value
    return out


def recipe_settings(recipe: Recipe) -> tuple[dict, dict]:
    base = settings(recipe.base["demo"], BASE_DEFAULTS, f"{recipe.path}: base.demo")
    data = settings(recipe.generate_data or {}, DATA_DEFAULTS, f"{recipe.path}: generate_data")
    if data["images"] < 1 or data["heldout"] < 1:
        raise Lav2Error(f"{recipe.path}: generate_data.images and .heldout must be at least 1")
    return base, data


# --- images ------------------------------------------------------------------------------------------------


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The outline of a shape of 'radius' r around (cx, cy), y down."""
    if shape == "square":
        s = r * 0.85  # about the area of the circle of radius r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    return [(cx + r * math.cos(2 * math.pi * i / 64), cy + r * math.sin(2 * math.pi * i / 64)) for i in range(64)]


def draw(rng: random.Random, size: int):
    """One picture: (PIL image, colour name, shape name)."""
    from PIL import Image, ImageDraw

    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if rng.random() < 0.5:  # a plain light or dark background, greyish so that it names no colour
        level, spread = rng.randint(190, 245), 15
    else:
        level, spread = rng.randint(15, 70), 15
    background = tuple(max(0, min(255, level + rng.randint(-spread, spread))) for _ in range(3))
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    r = rng.uniform(0.18, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).polygon(shape_points(shape, cx, cy, r), fill=fill)
    return image, colour, shape


def caption(colour: str, shape: str) -> str:
    return f"{'An' if colour[0] in 'aeiou' else 'A'} {colour} {shape}."


def answers(colour: str, shape: str) -> dict[str, str]:
    return {COLOUR_QUESTION: f"{colour.capitalize()}.", SHAPE_QUESTION: f"A {shape}."}


def draw_set(folder: Path, count: int, seed: int, size: int) -> list[dict]:
    folder.mkdir(parents=True)
    rng, records = random.Random(seed), []
    for i in range(count):
        image, colour, shape = draw(rng, size)
        image.save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "colour": colour, "shape": shape})
    return records


# --- the tiny base -----------------------------------------------------------------------------------------


def clip_config(c: dict) -> dict:
    """open_clip.CLIP kwargs of the demo's vision tower (the text tower is required by open_clip, unused)."""
    vision = {k: c[k] for k in ("image_size", "patch_size", "width", "layers", "head_width")}
    return {"embed_dim": c["embed_dim"], "quick_gelu": True, "vision_cfg": vision,
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def random_base(config: Config, seed: int) -> dict[str, torch.Tensor]:
    """Weights of an untrained LLaMA, initialised as one would before pretraining: unit-variance embeddings,
    1/sqrt(fan_in) matrices (the residual branches' output projections shrunk by sqrt(2 n_layers))."""
    torch.manual_seed(seed)
    model = LLaMAAdapter(config.base())
    state = {}
    for name in sorted(base_parameter_names(model)):
        shape = model.state_dict()[name].shape
        std = 1.0 if name == "tok_embeddings.weight" else shape[1] ** -0.5
        if name.endswith(("wo.weight", "w2.weight")):
            std /= math.sqrt(2 * config.n_layers)
        state[name] = torch.randn(shape) * std
    state.update({k: v.clone() for k, v in model.state_dict().items() if k.endswith("norm.weight")})
    return state


def texts_for_tokenizer(records: list[dict]) -> list[str]:
    texts = [CHAT_SYSTEM + CHAT_TURN.format(user=CAPTION_INSTRUCTION), ALPACA_NO_INPUT]
    for colour in COLOURS:
        for shape in SHAPES:
            texts += [caption(colour, shape), *answers(colour, shape).values()]
    texts += [CHAT_TURN.format(user=q) for q in (COLOUR_QUESTION, SHAPE_QUESTION)]
    texts += [f"{q} {a}" for q, a in TEXT_ONLY]
    return texts * 20


def generate(recipe: Recipe, folder: Path) -> None:
    """Write the demo's base, data and held-out images into `folder` (deterministic in the settings)."""
    base, data = recipe_settings(recipe)
    train = draw_set(folder / "data" / "images", data["images"], data["seed"], data["image_size"])
    heldout = draw_set(folder / "heldout", data["heldout"], data["seed"] * 1000 + data["heldout_seed"],
                       data["image_size"])
    write_jsonl(folder / "heldout" / "heldout.jsonl", heldout)
    write_jsonl(folder / "data" / "captions.jsonl",
                [{"image": f"images/{r['image']}", "caption": caption(r["colour"], r["shape"])} for r in train])
    instructions = [{"instruction": q, "output": a, "image": f"images/{r['image']}"}
                    for r in train for q, a in answers(r["colour"], r["shape"]).items()]
    instructions += [{"instruction": q, "output": a} for q, a in TEXT_ONLY] * data["text_only_repeat"]
    write_jsonl(folder / "data" / "instructions.jsonl", instructions)

    (folder / "base").mkdir()
    tokenizer = train_tokenizer(texts_for_tokenizer(train), folder / "base" / ".tokenizer.model",
                                vocab_size=base["vocab_size"])
    try:
        config = Config(dim=base["dim"], n_layers=base["n_layers"], n_heads=base["n_heads"],
                        vocab_size=tokenizer.vocab_size, multiple_of=base["multiple_of"],
                        max_seq_len=base["max_seq_len"])
    except ValueError as e:
        raise Lav2Error(f"{recipe.path}: base.demo does not make a model ({e}); fix its sizes") from None
    import open_clip

    torch.manual_seed(data["seed"])
    clip = open_clip.CLIP(**clip_config(base["clip"])).visual
    checkpoint.write_folder(folder / "base", config=config, layout="llama", tokenizer=tokenizer.path,
                            base_weights=random_base(config, data["seed"]),
                            clip_spec={"config": clip_config(base["clip"]), "weights": checkpoint.CLIP_FILE},
                            clip_weights=clip.state_dict(), source={"demo": base})
    tokenizer.path.unlink()


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def materialise(recipe: Recipe, folder: Path) -> Recipe:
    """The recipe with its base and data pointing at what `generate` wrote in `folder`."""
    recipe_settings(recipe)
    data = folder / "data"
    return replace(recipe, base=str(folder / "base"),
                   data=replace(recipe.data, instruction=(Source(data / "instructions.jsonl", "alpaca"),),
                                caption=(Source(data / "captions.jsonl", "captions"),)))


# --- evaluation --------------------------------------------------------------------------------------------


def evaluate(setup, recipe: Recipe, folder: Path) -> dict:
    """Held-out accuracy of both questions: the greedy answer contains the right colour / shape word."""
    from PIL import Image

    model, tokenizer = setup.model, setup.tokenizer
    records = [json.loads(line) for line in (folder / "heldout" / "heldout.jsonl").read_text().splitlines()]
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    images = torch.stack([setup.preprocess(Image.open(folder / "heldout" / r["image"])) for r in records]).to(device)
    model.eval()
    result = {"heldout": len(records)}
    for question, key in ((COLOUR_QUESTION, "colour"), (SHAPE_QUESTION, "shape")):
        prompt = encode_prompt(tokenizer, recipe.prompt_style, [Turn(question)])
        model.setup_cache(1, len(prompt) + MAX_ANSWER_TOKENS)
        replies = []
        with torch.no_grad():
            for image in images:
                ids = generate_tokens(model, prompt, images=image[None], max_new_tokens=MAX_ANSWER_TOKENS,
                                      temperature=0, stop_ids=[tokenizer.eos_id], vocab_size=tokenizer.vocab_size)
                replies.append(tokenizer.decode([i for i in ids if i != tokenizer.eos_id]).lower())
        model.clear_cache()
        result[f"{key}_accuracy"] = sum(r[key] in reply for r, reply in zip(records, replies)) / len(records)
        result[f"{key}_examples"] = replies[:3]
    return result


def format_result(result: dict) -> str:
    return (f"held-out ({result['heldout']} images): colour accuracy {result['colour_accuracy']:.0%}, shape accuracy "
            f"{result['shape_accuracy']:.0%} (chance: 17% and 25%)")
