"""Sampling with the KV cache, and the conversation that `lav2 chat` and `Loaded.generate` both run through.

The decode path is gpt-fast's: `prefill` runs the prompt once, `decode_one_token` feeds one token at a time into
the preallocated KV cache (`model.setup_cache`), `sample` picks the next token. The adapter prompts' and the
image's keys/values are computed by the forward that starts at position 0 and kept in each layer's cache, so an
image costs one CLIP pass per conversation. Every model call runs under torch.no_grad(): nothing is cached while
gradients are on (the model refuses `start_pos` with gradients enabled).

Multi-turn: the cache is continued across turns. `generate` is given the token ids the cache holds (`cached`)
and prefills only the tokens after their longest common prefix with the new prompt, at their own positions. When
the history is trimmed to fit the context window, or the image changes, that prefix shrinks to nothing (or to
the shared preamble) and the whole prompt is prefilled again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import torch

from lav2 import fastpath
from lav2.checkpoint import Loaded
from lav2.errors import Lav2Error
from lav2.images import ImageLike, load_image
from lav2.prompts import STOP_STRINGS, Turn, render_prompt

if TYPE_CHECKING:
    from lav2.model import LLaMAAdapter


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. The defaults are the official release's (llama_adapter.generate:
    temperature 0.1, top-p 0.75, 256 new tokens); temperature 0 is greedy."""

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 0  # 0: no top-k filter
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0  # 1: off; >1 divides the logits of tokens already in the context (CTRL)
    seed: Optional[int] = None  # None: a fresh random seed per conversation

    def __post_init__(self):
        # written as "not good" so that NaN, which fails every comparison, is refused too
        problems = [message for bad, message in (
            (not (math.isfinite(self.temperature) and self.temperature >= 0), "temperature must be >= 0 (0 is greedy)"),
            (not 0 < self.top_p <= 1, "top-p must be in (0, 1]"),
            (not self.top_k >= 0, "top-k must be >= 0 (0 is off)"),
            (not self.max_new_tokens >= 1, "max-new-tokens must be >= 1"),
            (not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0),
             "repetition-penalty must be > 0 (1 is off)"),
        ) if bad]
        if problems:
            raise Lav2Error("bad sampling settings: " + "; ".join(problems))


# --- the decode path ---------------------------------------------------------------------------------------


def sample(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None, seen: Optional[torch.Tensor] = None,
           repetition_penalty: float = 1.0) -> torch.Tensor:
    """The next token (1,) from last-position logits (V,). `seen` (V,) bool marks the tokens in the context,
    which the repetition penalty pushes down. Top-p keeps the smallest head of the sorted distribution whose mass
    reaches p (the official rule: drop a token when the mass before it already exceeds p)."""
    if seen is not None and repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)
    probs_sorted, order = probs.sort(descending=True)
    probs_sorted = probs_sorted.masked_fill(probs_sorted.cumsum(-1) - probs_sorted > top_p, 0.0)
    return order.gather(-1, torch.multinomial(probs_sorted, 1, generator=generator))


@torch.no_grad()
def prefill(model: "LLaMAAdapter", tokens: torch.Tensor, start_pos: int, images: Optional[torch.Tensor] = None, *,
            image_mask: Optional[torch.Tensor] = None, pad: Optional[torch.Tensor] = None,
            fast: bool = True) -> torch.Tensor:
    """Run tokens (B, T) at positions start_pos ... into the cache; logits (B, V) of the last one. Images go
    only with the forward that starts at position 0, which also caches the prompts' keys/values. The output head
    runs for the last position only. fast: compute under autocast to fastpath.prefill_dtype(model), where there is
    one; the cache keeps its own dtype for the decode steps. False: as the weights are stored."""
    dtype = fastpath.prefill_dtype(model) if fast else None
    with torch.autocast(tokens.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        hidden = model(tokens, images, image_mask=image_mask, start_pos=start_pos, pad=pad, head=False)
        return model.output(hidden[:, -1]).float()


@torch.no_grad()
def decode_one_token(model: "LLaMAAdapter", token: torch.Tensor, pos: int,
                     pad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Feed one token per row (B, 1) at position pos; logits (B, V) for the next."""
    return model(token, start_pos=pos, pad=pad)[:, -1]


def compiled_step(model: "LLaMAAdapter") -> Callable:
    """decode_one_token through torch.compile (fastpath.compiled_decode_step): the first answer waits for it."""
    return fastpath.compiled_decode_step(model, decode_one_token)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generate(model: "LLaMAAdapter", prompt_tokens: Sequence[int], *, images: Optional[torch.Tensor] = None,
             cached: Optional[list[int]] = None, max_new_tokens: int = 256, temperature: float = 0.1,
             top_p: float = 0.75, top_k: int = 0, repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (),
             generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
             step: Callable = decode_one_token, fast_prefill: bool = True) -> Iterator[int]:
    """Yield new token ids after prompt_tokens, batch 1, through the model's KV cache (see setup_cache).

    cached: the ids whose keys/values the cache holds from position 0, updated in place as tokens are fed.
    Only the tokens after its longest common prefix with prompt_tokens are prefilled; `images` (1, 3, H, W) are
    used only when that prefix is empty (they enter at position 0), so a caller that changes the image must clear
    `cached`. None: start from an empty cache. Stops after max_new_tokens or after yielding a stop id.
    vocab_size: sample among the first ids only, the tokenizer's (a checkpoint may pad its embedding rows).
    step: decode_one_token, or compiled_step(model). fast_prefill: prefill in fastpath.prefill_dtype(model).
    """
    cached = [] if cached is None else cached
    max_len = model.cache_length()
    if len(prompt_tokens) + max_new_tokens > max_len:
        raise ValueError(f"{len(prompt_tokens)} prompt + {max_new_tokens} new tokens exceed the KV cache's "
                         f"{max_len} positions (call model.setup_cache first)")
    device = model.tok_embeddings.weight.device
    start = min(common_prefix(cached, prompt_tokens), len(prompt_tokens) - 1)  # prefill at least one token
    del cached[start:]
    vocab_size = vocab_size or model.config.vocab_size
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(list(prompt_tokens), device=device)] = True
    new = torch.tensor(list(prompt_tokens[start:]), device=device)[None]
    logits = prefill(model, new, start, images if start == 0 else None, fast=fast_prefill)[0]
    cached.extend(prompt_tokens[start:])
    stop = set(stop_ids)
    for pos in range(len(prompt_tokens), len(prompt_tokens) + max_new_tokens):
        token = sample(logits[:vocab_size], temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                       seen=seen, repetition_penalty=repetition_penalty)
        token_id = int(token)  # the one host sync per token: needed to stop on eos and to stream text
        yield token_id
        if token_id in stop or pos + 1 == len(prompt_tokens) + max_new_tokens:
            return
        if seen is not None:
            seen[token] = True
        logits = step(model, token.view(1, 1), pos)[0]
        cached.append(token_id)


# --- streaming text ----------------------------------------------------------------------------------------

# What may still change or turn out not to be answer text: trailing whitespace (an answer does not end in
# spaces, and a stop string may follow) and U+FFFD, which SentencePiece gives for an incomplete UTF-8 sequence
# of byte-fallback pieces (<0xE2><0x82> before <0xAC> completes "€").
UNSETTLED_TAIL = re.compile(r"[\s\ufffd]*\Z")


class TextStream:
    """Token ids in, text pieces out. Decodes the growing id list (SentencePiece renders ▁ as a space and joins
    byte pieces into characters only in context) and emits the new suffix once it is settled: never half a
    character, never the start of a stop string. The pieces joined are the answer, stripped."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False  # a stop string appeared: the answer is complete

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids).lstrip()
        cut = min((i for i in (full.find(s) for s in self.stop_strings) if i >= 0), default=None)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut].rstrip())
        return self._emit(full[:self._settled_end(full)])

    def flush(self) -> str:
        """The rest, when generation ended (eos, length) or was stopped."""
        return "" if self.stopped else self._emit(self.tokenizer.decode(self.ids).strip())

    def _settled_end(self, full: str) -> int:
        end = len(full)
        for stop in self.stop_strings:  # hold back the longest tail that could start a stop string
            k = next((k for k in range(min(len(stop) - 1, end), 0, -1) if full.endswith(stop[:k])), 0)
            end = min(end, len(full) - k)
        return UNSETTLED_TAIL.search(full, 0, end).start()

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text):]
        self.text += piece
        return piece


# --- conversations -----------------------------------------------------------------------------------------


class Conversation:
    """A multi-turn chat with one model and at most one image, continued through the KV cache.

    `context` is text about the image from expert models (caption, OCR); it is given as the input of the first
    turn kept in the history, so it survives trimming. The history keeps to the context window: before a turn,
    the oldest turns are dropped until the prompt leaves room for the answer (`dropped` says how many).
    compile: decode through compiled_step (the first answer waits for the compilation). fast_prefill: prefill
    prompts in fastpath.prefill_dtype (bfloat16 on CPUs with bfloat16 matmuls); False: as the weights are stored.
    """

    def __init__(self, loaded: Loaded, sampling: Sampling = Sampling(), *, style: Optional[str] = None,
                 compile: bool = False, fast_prefill: bool = True):
        self.loaded, self.sampling, self.fast_prefill = loaded, sampling, fast_prefill
        self._step = compiled_step(loaded.model) if compile else decode_one_token
        self.style = style or loaded.info.get("prompt_style", "chat")
        self.turns: list[Turn] = []
        self.image: Optional[torch.Tensor] = None  # (1, 3, H, W), preprocessed
        self.context: Optional[str] = None
        self.dropped = 0
        self._cached: list[int] = []  # ids in the model's KV cache, from position 0
        self._kv = None  # the cache this conversation set up: another conversation may take the model over
        self._device = loaded.model.tok_embeddings.weight.device
        self._generator = torch.Generator(self._device)  # its own: sampling never touches the global RNG
        if sampling.seed is None:
            self._generator.seed()  # non-deterministic
        else:
            self._generator.manual_seed(sampling.seed)

    def set_image(self, image: Optional[ImageLike], context: Optional[str] = None) -> None:
        """Show the model this image (a path or a PIL image; None: no image) from the next turn on. The history
        stays; the whole conversation is prefilled again, since the image enters at position 0."""
        if image is not None and self.loaded.config.visual_len == 0:
            raise Lav2Error(f"{self.loaded.folder} is a text-only model (no visual branch): it cannot take an "
                            f"image; use a multimodal model folder, such as the one `lav2 download 7b` makes")
        pixels = None if image is None else load_image(image, self.loaded.preprocess)[None].to(self._device)
        self.image, self.context = pixels, context
        self._cached.clear()

    def reset(self) -> None:
        """Forget the history (the image stays)."""
        self.turns.clear()
        self._cached.clear()
        self.dropped = 0

    def ask(self, user: str) -> Iterator[str]:
        """Stream the answer to `user` as text pieces. The turn joins the history when the answer ends, and
        also when the caller stops early (Ctrl-C): then with the text streamed so far."""
        prompt, max_new = self._fit(Turn(user))
        stream = TextStream(self.loaded.tokenizer, STOP_STRINGS[self.style])
        self._take_cache()
        s = self.sampling
        tokens = generate(self.loaded.model, prompt, images=self.image, cached=self._cached, max_new_tokens=max_new,
                          temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          repetition_penalty=s.repetition_penalty, stop_ids=(self.loaded.tokenizer.eos_id,),
                          generator=self._generator, vocab_size=self.loaded.tokenizer.vocab_size, step=self._step,
                          fast_prefill=self.fast_prefill)
        try:
            for token_id in tokens:
                if token_id == self.loaded.tokenizer.eos_id:
                    break
                piece = stream.push(token_id)
                if piece:
                    yield piece
                if stream.stopped:
                    break
            piece = stream.flush()
            if piece:
                yield piece
        finally:
            tokens.close()
            self.turns.append(Turn(user, stream.text.strip()))

    def _render(self, turns: list[Turn]) -> list[int]:
        if self.context:
            turns = [replace(turns[0], input=self.context), *turns[1:]]
        return encode_dialog(self.loaded, turns, style=self.style)

    def _fit(self, turn: Turn) -> tuple[list[int], int]:
        """Prompt ids for the history plus `turn`, oldest turns dropped until room is left for the answer
        (max_new_tokens, but at most half the context, so that a long answer limit still leaves some history);
        and how many new tokens fit."""
        limit = self.loaded.config.max_seq_len
        room = min(self.sampling.max_new_tokens, limit // 2)
        turns = [*self.turns, turn]
        prompt = self._render(turns)
        while len(prompt) + room > limit and len(turns) > 1:
            turns = turns[1:]
            prompt = self._render(turns)
        if len(prompt) + room > limit:
            raise Lav2Error(f"the message is too long: the prompt is {len(prompt)} tokens and {room} more are kept "
                            f"for the answer, but the model's context is {limit} tokens; shorten it")
        self.dropped = len(self.turns) + 1 - len(turns)
        self.turns = turns[:-1]
        return prompt, min(self.sampling.max_new_tokens, limit - len(prompt))

    def _take_cache(self) -> None:
        """Own the model's KV cache: set one up if none is ours (another conversation may have used the model)."""
        model = self.loaded.model
        if self._kv is None or model.layers[0].attention.kv_cache is not self._kv:
            weights = model.tok_embeddings.weight
            model.setup_cache(1, self.loaded.config.max_seq_len, device=weights.device, dtype=weights.dtype)
            self._kv = model.layers[0].attention.kv_cache
            self._cached.clear()


def encode_dialog(loaded: Loaded, turns: Sequence[Turn], *, style: Optional[str] = None) -> list[int]:
    """The prompt ids the model continues for these turns (the last one's assistant is None), as `lav2 chat`
    feeds them, in the folder's prompt style unless `style` says otherwise."""
    style = style or loaded.info.get("prompt_style", "chat")
    return loaded.tokenizer.encode(render_prompt(style, list(turns)), bos=True)


# --- batches -----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(model: "LLaMAAdapter", prompts: Sequence[Sequence[int]], *, sampling: Sequence[Sampling],
                   images: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                   stop_ids: Sequence[int] = (), vocab_size: Optional[int] = None,
                   cancelled: Callable[[int], bool] = lambda row: False, step: Callable = decode_one_token,
                   fast_prefill: bool = True) -> Iterator[list[Optional[int]]]:
    """Decode several prompts together through one KV cache: yields, for every step, each row's new token id
    (None for a row that has finished). A row stops after its sampling.max_new_tokens, a stop id, or when
    cancelled(row) turns true. The prompts are left-padded to one length (see LLaMAAdapter.forward's `pad`), so
    each weight matrix is read once per step for all rows, and a greedy row gives what decoding it alone gives.
    images (B, 3, H, W) with image_mask (B,) False where a row has none. Sets up the model's KV cache.
    fast_prefill: prefill in fastpath.prefill_dtype(model)."""
    B, device = len(prompts), model.tok_embeddings.weight.device
    lengths = [len(p) for p in prompts]
    longest, new = max(lengths), [s.max_new_tokens for s in sampling]
    model.setup_cache(B, longest + max(new))
    pad = torch.tensor([longest - n for n in lengths], device=device)
    tokens = torch.zeros(B, longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
    vocab_size = vocab_size or model.config.vocab_size
    generators = [torch.Generator(device) for _ in sampling]
    for generator, s in zip(generators, sampling):
        if s.seed is None:
            generator.seed()  # non-deterministic
        else:
            generator.manual_seed(s.seed)
    seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        seen[row, torch.tensor(list(prompt), device=device)] = True
    logits = prefill(model, tokens, 0, images, image_mask=image_mask, pad=pad, fast=fast_prefill)  # (B, V)
    stop, done, produced = set(stop_ids), [False] * B, [0] * B
    try:
        for pos in range(longest, longest + max(new)):
            out: list[Optional[int]] = []
            next_tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
            for row, s in enumerate(sampling):
                if done[row] or cancelled(row):
                    done[row] = True
                    out.append(None)
                    continue
                token = sample(logits[row, :vocab_size], temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                               generator=generators[row], seen=seen[row], repetition_penalty=s.repetition_penalty)
                next_tokens[row, 0] = token
                seen[row, token] = True
                token_id = int(token)
                produced[row] += 1
                done[row] = token_id in stop or produced[row] == new[row]
                out.append(token_id)
            yield out
            if all(done):
                return
            logits = step(model, next_tokens, pos, pad)
    finally:
        model.clear_cache()


@dataclass
class Piece:
    """Part of one row's answer in stream_batch: new settled text, and at the end why the row stopped."""

    row: int
    text: str
    finish: Optional[str]  # None while the row runs; then "stop" (eos or a stop string), "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int


def stream_batch(loaded: Loaded, dialogs: Sequence[Sequence[Turn]], *,
                 images: Optional[Sequence[Optional[ImageLike]]] = None,
                 sampling: Union[Sampling, Sequence[Sampling]] = Sampling(), style: Optional[str] = None,
                 cancelled: Callable[[int], bool] = lambda row: False) -> Iterator[Piece]:
    """Answer several dialogs at once (generate_batch): yields Pieces as each row's text settles, and one
    final Piece per row (finish set). Each dialog ends with a user turn; images: one per dialog or None. A prompt
    and its max_new_tokens must fit the model's context (Lav2Error before anything runs). Rows that would not
    fit one cache together (a long prompt beside a long answer) are decoded in groups, one after the other.
    Not thread-safe: the model has one KV cache."""
    sampling = [sampling] * len(dialogs) if isinstance(sampling, Sampling) else list(sampling)
    images = list(images) if images is not None else [None] * len(dialogs)
    if not len(dialogs) == len(sampling) == len(images):
        raise ValueError("stream_batch: dialogs, images and sampling must have the same length")
    if any(image is not None for image in images) and loaded.config.visual_len == 0:
        raise Lav2Error(f"{loaded.folder} is a text-only model (no visual branch): it cannot take an image")
    prompts = [encode_dialog(loaded, turns, style=style) for turns in dialogs]
    limit = loaded.config.max_seq_len
    for row, (prompt, s) in enumerate(zip(prompts, sampling)):
        if len(prompt) + s.max_new_tokens > limit:
            raise Lav2Error(f"dialog {row}: its prompt is {len(prompt)} tokens and {s.max_new_tokens} more are asked "
                            f"for the answer, but the model's context is {limit} tokens; shorten it or ask for less")
    pixels = [None if image is None else load_image(image, loaded.preprocess) for image in images]
    for group in fitting_groups([len(p) for p in prompts], [s.max_new_tokens for s in sampling], limit):
        yield from _stream_group(loaded, group, [prompts[i] for i in group], [pixels[i] for i in group],
                                 [sampling[i] for i in group], style or loaded.info.get("prompt_style", "chat"),
                                 cancelled)


def fitting_groups(lengths: Sequence[int], new: Sequence[int], limit: int) -> list[list[int]]:
    """Rows split, in order of prompt length, into groups whose longest prompt plus largest answer fit `limit`."""
    groups: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda r: lengths[r]):
        group = groups[-1] if groups else None
        if group is None or max(lengths[r] for r in group + [row]) + max(new[r] for r in group + [row]) > limit:
            groups.append([row])
        else:
            group.append(row)
    return groups


def _stream_group(loaded: Loaded, rows: list[int], prompts: list[list[int]], pixels: list[Optional[torch.Tensor]],
                  sampling: list[Sampling], style: str, cancelled: Callable[[int], bool]) -> Iterator[Piece]:
    device = loaded.model.tok_embeddings.weight.device
    images = image_mask = None
    if any(p is not None for p in pixels):
        shape = next(p for p in pixels if p is not None).shape
        images = torch.stack([p if p is not None else torch.zeros(shape) for p in pixels]).to(
            device, loaded.model.tok_embeddings.weight.dtype)
        image_mask = torch.tensor([p is not None for p in pixels], device=device)
    tokenizer = loaded.tokenizer
    streams = [TextStream(tokenizer, STOP_STRINGS[style]) for _ in rows]
    counts, finished = [0] * len(rows), [False] * len(rows)

    def stop_row(i: int) -> bool:  # a stop string also ends a row
        return finished[i] or cancelled(rows[i])

    def final(i: int, reason: str) -> Piece:
        finished[i] = True
        return Piece(rows[i], streams[i].flush() if reason != "cancelled" else "", reason, len(prompts[i]), counts[i])

    for step_tokens in generate_batch(loaded.model, prompts, sampling=sampling, images=images, image_mask=image_mask,
                                      stop_ids=(tokenizer.eos_id,), vocab_size=tokenizer.vocab_size,
                                      cancelled=stop_row):
        for i, token_id in enumerate(step_tokens):
            if finished[i]:
                continue
            if token_id is None:  # cancelled by the caller
                yield final(i, "cancelled")
                continue
            counts[i] += 1
            if token_id == tokenizer.eos_id:
                yield final(i, "stop")
                continue
            piece = streams[i].push(token_id)
            if piece:
                yield Piece(rows[i], piece, None, len(prompts[i]), counts[i])
            if streams[i].stopped:
                yield final(i, "stop")
            elif counts[i] == sampling[i].max_new_tokens:
                yield final(i, "length")
    for i in range(len(rows)):
        if not finished[i]:  # generate_batch ended (every row done) before its final piece was due
            yield final(i, "cancelled" if cancelled(rows[i]) else "length")


def answer_batch(loaded: Loaded, dialogs: Sequence[Sequence[Turn]], *,
                 images: Optional[Sequence[Optional[ImageLike]]] = None,
                 sampling: Union[Sampling, Sequence[Sampling]] = Sampling(temperature=0),
                 style: Optional[str] = None) -> list[str]:
    """The answers to several dialogs, decoded together (stream_batch); greedy by default."""
    texts = [""] * len(dialogs)
    for piece in stream_batch(loaded, dialogs, images=images, sampling=sampling, style=style):
        texts[piece.row] += piece.text
    return [t.strip() for t in texts]


def answer(loaded: Loaded, prompt: str, image: Optional[ImageLike] = None, *,
           stream: bool = False, **sampling) -> Union[str, Iterator[str]]:
    """One turn, through the same code path as `lav2 chat`: the answer text, or its pieces with stream=True.
    sampling: the fields of Sampling (temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed)."""
    conversation = Conversation(loaded, Sampling(**sampling))
    if image is not None:
        conversation.set_image(image)
    pieces = conversation.ask(prompt)
    return pieces if stream else "".join(pieces)


@dataclass
class Model(Loaded):
    """What lav2.load returns: a loaded folder that answers (`generate`) as `lav2 chat` does."""

    def generate(self, prompt: str, image: Optional[ImageLike] = None, **sampling) -> Union[str, Iterator[str]]:
        return answer(self, prompt, image=image, **sampling)
