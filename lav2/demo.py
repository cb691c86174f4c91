"""The offline demo's data: everything recipes/shapes.yaml trains on, generated locally from seeds.

`generate(folder)` (the command `lav2 demo FOLDER`) writes:

    base/      a lav2 base folder: a tiny random LLaMA (frozen, like any base), a tiny open_clip ViT (frozen)
               pretrained with open_clip's contrastive loss on 10000 picture-caption pairs of its own, as a real
               CLIP is pretrained before it is frozen (a random tower tells colours apart, not shapes), and a
               SentencePiece model trained on the demo's texts
    data/      images of one shape (circle, square, triangle, star) in one of six colours at a random place and
               size on a plain light or dark background; captions.jsonl ("A red circle."), instructions.jsonl
               ("What colour is the shape?" -> "Red.", "What shape is it?" -> "A circle.", a few text-only)
    heldout/   more images drawn with another seed (0.png, 1.png, ...) and eval.jsonl, both questions about each
               image in the format of `lav2 eval --task vqa`

recipes/shapes.yaml is an ordinary recipe over these files; nothing else in lav2 knows about the demo.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from lav2 import checkpoint
from lav2.errors import Lav2Error
from lav2.model import Config, LLaMAAdapter, base_parameter_names
from lav2.prompts import ALPACA_NO_INPUT, CAPTION_INSTRUCTION, CHAT_SYSTEM, CHAT_TURN
from lav2.tokenizer import train_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "purple": (140, 50, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "star")
COLOUR_QUESTION, SHAPE_QUESTION = "What colour is the shape?", "What shape is it?"
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

# the tiny LLaMA (vocab_size is the tokenizer's, found after training it) and its CLIP tower
BASE = dict(dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=256, vocab_size=1000)
# 8 px patches: 17 tokens, 5x cheaper to pretrain than 4 px ones, and shape as well told apart (measured)
CLIP = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16, "embed_dim": 32}
IMAGE_SIZE, TEXT_ONLY_REPEAT, HELDOUT_SEED = 64, 20, 1
# contrastive pretraining of the tiny CLIP (then frozen), on pictures and captions of its own, as a real CLIP
# is pretrained on far more pairs than an adapter is tuned on; at most CLIP_IMAGES pairs
CLIP_STEPS, CLIP_IMAGES, CLIP_BATCH, CLIP_LR, CLIP_WARMUP, CLIP_SEED = 3000, 10000, 64, 2e-3, 20, 2


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


def draw_set(folder: Path, count: int, seed: int, size: int) -> tuple[list[dict], list]:
    """Draw and save `count` pictures; returns their records and the PIL images."""
    folder.mkdir(parents=True)
    rng, records, images = random.Random(seed), [], []
    for i in range(count):
        image, colour, shape = draw(rng, size)
        image.save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "colour": colour, "shape": shape})
        images.append(image)
    return records, images


# --- the tiny base -----------------------------------------------------------------------------------------


# the text tower open_clip requires: used only to pretrain the vision tower (captions of up to 5 words)
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


def clip_config(c: dict) -> dict:
    """open_clip.CLIP kwargs of the demo's vision tower (the text tower is required by open_clip, unused)."""
    vision = {k: c[k] for k in ("image_size", "patch_size", "width", "layers", "head_width")}
    return {"embed_dim": c["embed_dim"], "quick_gelu": True, "vision_cfg": vision,
            "text_cfg": TEXT_CFG}


# --- the tiny CLIP, pretrained -----------------------------------------------------------------------------

# A word-level tokenizer for the CLIP text tower: captions are "A|An <colour> <shape>."; 0 pads, 1 starts a
# caption and the end token takes the highest id, where open_clip pools the text ("argmax").
CLIP_WORDS = ("a", "an", *COLOURS, *SHAPES)


def caption_tokens(texts: list[str]) -> torch.Tensor:
    """(N, context_length) token ids of the captions for the CLIP text tower (TEXT_CFG)."""
    end = TEXT_CFG["vocab_size"] - 1
    ids = torch.zeros(len(texts), TEXT_CFG["context_length"], dtype=torch.long)
    for i, text in enumerate(texts):
        row = [1, *(2 + CLIP_WORDS.index(w) for w in text.lower().rstrip(".").split()), end]
        ids[i, :len(row)] = torch.tensor(row)
    return ids


def clip_pixels(clip, images: list) -> torch.Tensor:
    """(N, 3, S, S): the images through the eval transform lav2.load gives this tower (checkpoint.load_clip)."""
    transform = checkpoint.clip_transform(clip.visual)
    return torch.stack([transform(image) for image in images])


def clip_pairs(clip, *, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` pictures drawn in memory for the CLIP's pretraining, with their captions: (pixels, tokens)."""
    rng = random.Random(seed * 1000 + CLIP_SEED)
    drawn = [draw(rng, IMAGE_SIZE) for _ in range(count)]
    tokens = caption_tokens([caption(colour, shape) for _, colour, shape in drawn])
    return clip_pixels(clip, [image for image, _, _ in drawn]), tokens


@torch.no_grad()
def zero_shot(clip, images: list, records: list[dict]) -> dict[str, float]:
    """How often the CLIP's nearest caption among all 24 names the right colour and the right shape."""
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    training = clip.training
    clip.eval()
    text = clip.encode_text(caption_tokens([caption(*pair) for pair in pairs]), normalize=True)
    nearest = (clip.encode_image(clip_pixels(clip, images), normalize=True) @ text.T).argmax(dim=1).tolist()
    clip.train(training)
    return {kind: sum(pairs[n][i] == r[kind] for n, r in zip(nearest, records)) / len(records)
            for i, kind in enumerate(("colour", "shape"))}


def clip_loss(clip, pixels: torch.Tensor, tokens: torch.Tensor, *, batch: int = CLIP_BATCH) -> float:
    """The mean contrastive loss over consecutive batches of the pairs (eval mode, no gradients)."""
    import open_clip

    loss_fn, losses, training = open_clip.ClipLoss(), [], clip.training
    clip.eval()
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            image, text, scale = clip(pixels[i:i + batch], tokens[i:i + batch])[:3]
            losses.append(loss_fn(image, text, scale).item() * len(image))
    clip.train(training)
    return sum(losses) / len(pixels)


def pretrain_clip(clip, pixels: torch.Tensor, tokens: torch.Tensor, *, steps: int, seed: int,
                  batch: int = CLIP_BATCH, lr: float = CLIP_LR) -> None:
    """Train both towers with open_clip's contrastive loss on the image-caption pairs: AdamW, linear warmup
    then cosine, shuffled batches drawn from a generator seeded by `seed`. Captions name the colour and the
    shape, so the image features must come to tell both apart."""
    import open_clip

    loss_fn, generator = open_clip.ClipLoss(), torch.Generator().manual_seed(seed)
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    batch = min(batch, len(pixels))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest on a shared CPU, and the same on any machine
    clip.train()
    try:
        train_clip_steps(clip, optimizer, loss_fn, generator, pixels, tokens, steps=steps, batch=batch, lr=lr)
    finally:
        torch.set_num_threads(threads)
    clip.eval()


def train_clip_steps(clip, optimizer, loss_fn, generator, pixels, tokens, *, steps: int, batch: int, lr: float):
    from lav2.finetune import schedule_factor

    order, warmup = torch.empty(0, dtype=torch.long), min(CLIP_WARMUP, max(1, steps // 10))
    for step in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(pixels), generator=generator)])
        index, order = order[:batch], order[batch:]
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule_factor(step, steps, warmup=warmup)
        image, text, scale = clip(pixels[index], tokens[index])[:3]
        loss = loss_fn(image, text, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))


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


def generate(folder: Path, *, seed: int = 0, images: int = 2000, heldout: int = 100,
             clip_steps: int = CLIP_STEPS) -> Path:
    """Write the demo's base, data and held-out set into `folder` (new; deterministic in the arguments);
    `clip_steps` contrastive steps pretrain the tiny CLIP (0: it stays random)."""
    if images < 1 or heldout < 1:
        raise Lav2Error(f"the demo needs at least one training and one held-out image (got {images}, {heldout})")
    if clip_steps < 0:
        raise Lav2Error(f"clip_steps must be 0 or more (got {clip_steps})")
    with checkpoint.atomic_folder(Path(folder)) as tmp:
        write_demo(tmp, seed=seed, images=images, heldout=heldout, clip_steps=clip_steps)
    return Path(folder)


def write_demo(folder: Path, *, seed: int, images: int, heldout: int, clip_steps: int) -> None:
    train, _ = draw_set(folder / "data" / "images", images, seed, IMAGE_SIZE)
    held, held_images = draw_set(folder / "heldout", heldout, seed * 1000 + HELDOUT_SEED, IMAGE_SIZE)
    write_jsonl(folder / "heldout" / "eval.jsonl",
                [{"image": r["image"], "question": question, "answers": [answer] * 10, "answer_type": kind}
                 for r in held for (question, answer), kind in zip(answers(r["colour"], r["shape"]).items(),
                                                                   ("colour", "shape"))])
    write_jsonl(folder / "data" / "captions.jsonl",
                [{"image": f"images/{r['image']}", "caption": caption(r["colour"], r["shape"])} for r in train])
    instructions = [{"instruction": q, "output": a, "image": f"images/{r['image']}"}
                    for r in train for q, a in answers(r["colour"], r["shape"]).items()]
    instructions += [{"instruction": q, "output": a} for q, a in TEXT_ONLY] * TEXT_ONLY_REPEAT
    write_jsonl(folder / "data" / "instructions.jsonl", instructions)

    (folder / "base").mkdir()
    tokenizer = train_tokenizer(texts_for_tokenizer(train), folder / "base" / ".tokenizer.model",
                                vocab_size=BASE["vocab_size"])
    config = Config(**{**BASE, "vocab_size": tokenizer.vocab_size})
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.CLIP(**clip_config(CLIP))
    # no more pairs than the steps can see (a short test run draws few)
    pixels, tokens = clip_pairs(clip, seed=seed, count=min(CLIP_IMAGES, max(1, clip_steps) * CLIP_BATCH))
    before = clip_loss(clip, pixels, tokens)
    pretrain_clip(clip, pixels, tokens, steps=clip_steps, seed=seed)
    demo_source = {"seed": seed, "clip_steps": clip_steps, "clip_pairs": len(pixels),
                   "clip_loss": {"before": before, "after": clip_loss(clip, pixels, tokens)},
                   "clip_zero_shot_heldout": zero_shot(clip, held_images, held)}
    checkpoint.write_folder(folder / "base", config=config, layout="llama", tokenizer=tokenizer.path,
                            base_weights=random_base(config, seed),
                            clip_spec={"config": clip_config(CLIP), "weights": checkpoint.CLIP_FILE},
                            clip_weights=clip.visual.state_dict(), source={"demo": demo_source})
    tokenizer.path.unlink()


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
