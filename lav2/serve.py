"""`lav2 serve`: the OpenAI chat-completions API over one model, for the `openai` client and the tools built on it.

    POST /v1/chat/completions   messages (text, content parts, one image as a data URL), streaming as SSE
    GET  /v1/models             the model folder's name as the model id, with its layout, prompt style, context
    GET  /health                liveness, and how many requests wait and run

Why FastAPI on uvicorn: it is what OpenAI-compatible Python servers are commonly built on, and it gives what this
needs without hand-written protocol code: an asyncio server whose StreamingResponse stops the stream as soon as
the client disconnects (which is what lets a batch row be cancelled at once), pydantic to check the request's
types, and uvicorn's own clean Ctrl-C and graceful shutdown.

Concurrency: one worker thread owns the model (torch is called from that thread only). Requests wait in a bounded
queue; whenever the worker is free it takes every waiting request, up to --max-batch, and decodes them together
through generate.stream_batch (static batching: a batch runs until its last row ends; requests that arrive
meanwhile wait for the next round). A full queue answers 503. A client that disconnects frees its place at once:
a waiting request leaves the queue, a running row is cancelled. At Ctrl-C, open answers end with a 503.

Safety: it listens on 127.0.0.1 unless --host says otherwise; with an API key, every /v1 request needs
`Authorization: Bearer KEY` (GET /health does not). Limits: a 20 MiB body, one image of at most 10 MiB and
4096 x 4096 pixels (and Pillow's decompression-bomb guard), given inline as a data URL (remote URLs are refused,
never fetched); 256 messages; 4 stop strings; max_tokens at most the context left after the prompt (default: 256,
or what is left). Every bad request gets a 4xx with OpenAI's error object and one clear message.

How messages become the model's prompt: leading system (or developer) messages are folded into the first user
message's text (the prompt formats have no system slot); then user and assistant messages must alternate, ending
with a user message, and become `prompts.Turn`s rendered as `lav2 chat` renders them. The model takes one image
per conversation: an image in any user message is the conversation's image. Unknown request fields are ignored, as
OpenAI ignores vendor extras; `top_k` and `repetition_penalty` are lav2's own extras. Omitted sampling settings
take the model's defaults (generate.Sampling, the official release's), not OpenAI's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, AsyncIterator, Iterator, Literal, Optional, Union

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from lav2.checkpoint import CONFIG_FILE, Loaded
from lav2.errors import Lav2Error
from lav2.generate import Piece, Sampling, encode_dialog, stream_batch
from lav2.images import open_image
from lav2.prompts import Turn

log = logging.getLogger("lav2.serve")

MAX_BODY_BYTES = 20 * 2**20
MAX_IMAGE_BYTES = 10 * 2**20  # decoded; Pillow's own decompression-bomb guard applies as well
MAX_IMAGE_PIXELS = 4096 * 4096  # CLIP sees 224 x 224: a larger image only costs decoding time and memory
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4  # as OpenAI
DEFAULT_MAX_TOKENS = Sampling().max_new_tokens  # when a request sets no limit (the room left caps it too)


# --- errors in OpenAI's shape ------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the server refuses, or a failure it reports: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- the request -------------------------------------------------------------------------------------------


class Strict(BaseModel):
    """Known fields must have their types (no "0.5" for a number, no 1 for true); unknown ones are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(Strict):
    url: str


class ContentPart(Strict):
    """One part of a message: {"type": "text", "text"} or {"type": "image_url", "image_url": {"url"}}."""

    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None

    @model_validator(mode="after")
    def _has_its_field(self) -> "ContentPart":
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} part needs a {self.type!r} field")
        return self


def as_parts(content: object) -> object:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise ValueError("content must be a string or a list of content parts")


def as_list(stop: object) -> object:
    return [] if stop is None else [stop] if isinstance(stop, str) else stop


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[list[ContentPart], BeforeValidator(as_parts)]

    def text(self) -> str:
        return "\n".join(part.text for part in self.content if part.type == "text")

    def image_urls(self) -> list[str]:
        return [part.image_url.url for part in self.content if part.type == "image_url"]


class StreamOptions(Strict):
    include_usage: Optional[bool] = False


class ChatRequest(Strict):
    model: Optional[str] = None  # any name is accepted: the server has one model, named in the response
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(as_list),
                    Field(max_length=MAX_STOP_STRINGS)] = []
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    top_k: Optional[int] = Field(None, ge=0)  # lav2 extra (0: off)
    repetition_penalty: Optional[float] = Field(None, gt=0)  # lav2 extra (1: off)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: Optional[int]) -> Optional[int]:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported: one choice per request (send several requests instead)")
        return n


def param_name(loc: tuple) -> str:
    """pydantic's error location as OpenAI names a parameter: messages[0].content[1].image_url.url"""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]  # one clear message: the first problem
        message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        param = param_name(error["loc"])
        raise ApiError(400, f"{param}: {message}" if param else message, param=param or None) from None


# --- images ------------------------------------------------------------------------------------------------

DATA_URL_HINT = "send the image inline as a data URL: data:image/png;base64,<base64 of the file>"


def decode_image(url: str, *, param: Optional[str] = None) -> Image.Image:
    """A data URL's image, checked against the limits; remote URLs are refused, never fetched."""
    scheme, colon, rest = url.partition(":")
    if not colon:
        raise ApiError(400, f"the image URL is not a URL; {DATA_URL_HINT}", param=param)
    if scheme.lower() in ("http", "https"):
        raise ApiError(400, f"remote image URLs are not fetched by this server; {DATA_URL_HINT}", param=param)
    if scheme.lower() != "data":
        raise ApiError(400, f"unsupported image URL scheme {scheme!r}; {DATA_URL_HINT}", param=param)
    header, comma, payload = rest.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ApiError(400, f"the data URL is not base64-encoded; {DATA_URL_HINT}", param=param)
    try:
        data = base64.b64decode(payload, validate=True)  # the body limit bounds its size
    except (binascii.Error, ValueError):
        raise ApiError(400, f"the data URL's payload is not valid base64; {DATA_URL_HINT}", param=param) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(400, f"the image file is larger than {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller one",
                       param=param)
    too_many = f"the image has more than {MAX_IMAGE_PIXELS:,} pixels; send a smaller one"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ApiError(400, f"{too_many} ({width} x {height})", param=param)
            image.load()  # decode now: a truncated image fails here, not in the worker
            return open_image(image)
    except UnidentifiedImageError:
        raise ApiError(400, "the image does not decode: not a format Pillow reads (PNG, JPEG, WebP, ...)",
                       param=param) from None
    except Image.DecompressionBombError:
        raise ApiError(400, too_many, param=param) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ApiError(400, f"the image does not decode: it is corrupt or truncated ({e})", param=param) from None


# --- request -> conversation -------------------------------------------------------------------------------


def conversation(messages: list[Message], *, multimodal: bool) -> tuple[list[Turn], Optional[Image.Image]]:
    """The Turns and the one image of a request's messages (see the module docstring for the rules)."""
    system = []
    while messages and messages[0].role in ("system", "developer"):
        system.append(messages[0].text())
        messages = messages[1:]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role in ("system", "developer"):
            raise ApiError(400, "system messages are taken only at the start of the conversation, before the "
                                "first user message (they are folded into its text)", param="messages")
        if message.role != expected:
            raise ApiError(400, f"messages must alternate user and assistant after the system messages, ending "
                                f"with a user message; message {len(system) + i} is {message.role!r} where "
                                f"{expected!r} was expected", param="messages")
    if not messages or messages[-1].role != "user":
        raise ApiError(400, "the last message must be a user message (the model answers it)", param="messages")
    images = [(f"messages[{len(system) + i}].content", url) for i, message in enumerate(messages)
              for url in message.image_urls()]
    if any(message.role != "user" and message.image_urls() for message in messages):
        raise ApiError(400, "images go in user messages only", param="messages")
    if len(images) > 1:
        raise ApiError(400, f"{len(images)} images in the messages, but the model takes one image per "
                            f"conversation: send one", param=images[1][0])
    if images and not multimodal:
        raise ApiError(400, "this is a text-only model (no visual branch): it cannot take an image",
                       param=images[0][0])
    image = decode_image(images[0][1], param=images[0][0]) if images else None
    texts = [message.text() for message in messages]
    if system:
        texts[0] = "\n\n".join([*system, texts[0]])
    turns = [Turn(texts[i], texts[i + 1] if i + 1 < len(texts) else None) for i in range(0, len(texts), 2)]
    return turns, image


class StopCut:
    """A request's own stop strings over the streamed text: holds back a tail that could start one, and cuts the
    answer just before the first one found (which the answer does not contain, as in OpenAI's API)."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False

    def push(self, text: str) -> str:
        text = self.held + text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
            self.hit, self.held = True, ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return rest


# --- jobs and the worker -----------------------------------------------------------------------------------


@dataclass
class Delta:
    text: str


@dataclass
class End:
    finish: str  # "stop" or "length"
    usage: dict


Event = Union[Delta, End, ApiError]


@dataclass(eq=False)
class Job:
    """One request on its way through the worker; its events go to the request's asyncio queue."""

    turns: list[Turn]
    image: Optional[Image.Image]
    sampling: Sampling
    stop: StopCut
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    gone: bool = False  # the client left
    ended: bool = False  # its last event is sent

    @property
    def done(self) -> bool:
        """Nothing more is wanted from its row: stream_batch may cancel it."""
        return self.gone or self.ended

    def send(self, event: Event) -> None:
        if self.done:
            return
        self.ended = not isinstance(event, Delta)
        with contextlib.suppress(RuntimeError):  # the server's loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def take(self, piece: Piece) -> list[Event]:
        """The events a Piece of this job's row makes: its text (through the stop strings), and the end."""
        if self.done:
            return []
        text = self.stop.push(piece.text)
        finish = "stop" if self.stop.hit else piece.finish
        ends = finish in ("stop", "length")  # not "cancelled": only rows that are done are cancelled
        if ends:
            text += self.stop.flush()
        events: list[Event] = [Delta(text)] if text else []
        if ends:
            events.append(End(finish, {"prompt_tokens": piece.prompt_tokens,
                                       "completion_tokens": piece.completion_tokens,
                                       "total_tokens": piece.prompt_tokens + piece.completion_tokens}))
        return events


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", code="server_shutting_down")


class Engine:
    """The model, its one worker thread, and the bounded queue of requests waiting for it."""

    def __init__(self, loaded: Loaded, *, max_batch: int = 8, max_queue: int = 32):
        self.loaded, self.max_batch, self.max_queue = loaded, max_batch, max_queue
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._lock = threading.Condition()  # guards the queue and the counts; notified when work arrives
        self._closing = False
        self.completed = 0  # requests answered
        self.cancelled = 0  # requests whose client left, waiting or running
        self._thread = threading.Thread(target=self._work, name="lav2-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new requests and end every open one with a 503 (their rows are cancelled): at Ctrl-C, clients
        are told at once instead of being cut off after uvicorn's grace time."""
        with self._lock:
            self._closing = True
            for job in [*self._waiting, *self._running]:
                job.send(shutting_down())
            self._waiting.clear()
            self._lock.notify()

    def close(self) -> None:
        self.stop()
        self._thread.join(timeout=30)

    def counts(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "running": len(self._running), "completed": self.completed,
                "cancelled": self.cancelled}

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise shutting_down()
            if len(self._waiting) >= self.max_queue:
                raise ApiError(503, f"the server is busy: {len(self._waiting)} requests are waiting already; "
                                    f"retry later", code="server_overloaded")
            self._waiting.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """The client left: a waiting job leaves the queue now, a running row stops at its next token."""
        with self._lock:
            if job.done:
                return
            job.gone = True
            self.cancelled += 1
            if job in self._waiting:
                self._waiting.remove(job)

    def _next_batch(self) -> Optional[list[Job]]:
        with self._lock:
            self._lock.wait_for(lambda: self._waiting or self._closing)
            if self._closing:
                return None
            self._running = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            return self._running

    def _work(self) -> None:
        while (jobs := self._next_batch()) is not None:
            try:
                pieces = stream_batch(self.loaded, [job.turns for job in jobs], images=[job.image for job in jobs],
                                      sampling=[job.sampling for job in jobs],
                                      cancelled=lambda row: jobs[row].done)
                for piece in pieces:
                    job = jobs[piece.row]
                    for event in job.take(piece):
                        with self._lock:  # counted before the client sees it, and never also as cancelled
                            if isinstance(event, End) and not job.done:
                                self.completed += 1
                            job.send(event)
            except Lav2Error as e:
                for job in jobs:
                    job.send(ApiError(400, str(e)))
            except Exception:  # a bug or a device failure: reported to its requests, and the server goes on
                log.exception("decoding a batch of %d failed", len(jobs))
                for job in jobs:
                    job.send(ApiError(500, "the model failed while answering this request; see the server's log"))
            finally:
                with self._lock:
                    self._running = []


# --- the HTTP layer ----------------------------------------------------------------------------------------


class ClientLeft(Exception):
    pass


async def read_body(request: Request) -> bytes:
    """The body, refused past MAX_BODY_BYTES (announced or as it arrives)."""
    too_large = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_large
    except ClientDisconnect:  # answered to nobody, but without a traceback in the log
        raise ApiError(400, "the client disconnected before the whole request body arrived") from None
    return bytes(body)


async def until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def next_event(job: Job, watcher: asyncio.Task) -> Event:
    """The job's next event, or ClientLeft if the client disconnects first."""
    getter = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise ClientLeft


def model_card(loaded: Loaded) -> dict:
    """The model as GET /v1/models lists it: OpenAI's fields, and what a client may want to know of a lav2 model."""
    info = loaded.info
    return {"id": loaded.folder.name, "object": "model", "created": int((loaded.folder / CONFIG_FILE).stat().st_mtime),
            "owned_by": "lav2", "layout": info.get("layout"), "prompt_style": info.get("prompt_style", "chat"),
            "context_length": loaded.config.max_seq_len, "multimodal": bool(loaded.config.visual_len)}


class Completion:
    """One request's response in OpenAI's shapes: the whole chat.completion, or its chunks as SSE events."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model

    def whole(self, text: str, end: End) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": end.finish, "logprobs": None}], "usage": end.usage}

    def chunk(self, choice: Optional[dict], **extra) -> str:
        """choice: the delta (and finish_reason) of choice 0; None for the usage-only chunk."""
        choices = [] if choice is None else [{"index": 0, "finish_reason": None, "logprobs": None, **choice}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(loaded: Loaded, *, api_key: Optional[str] = None, max_batch: int = 8,
               max_queue: int = 32) -> FastAPI:
    """The API over `loaded`; its worker starts and stops with the app (uvicorn's lifespan)."""
    engine = Engine(loaded, max_batch=max_batch, max_queue=max_queue)
    card = model_card(loaded)
    model_id = card["id"]
    context = loaded.config.max_seq_len

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="lav2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(Lav2Error)
    async def lav2_error(request, e: Lav2Error):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # FastAPI's own: unknown route, wrong method
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):  # uvicorn logs the traceback; the client gets OpenAI's shape
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__}); see the server's log").body(),
                            status_code=500)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` with "
                                "the key the server was started with", code="invalid_api_key")

    def prepare(body: bytes) -> tuple[ChatRequest, list[Turn], Optional[Image.Image], Sampling]:
        """Parse and check a request, decode its image, and size its answer (off the event loop; no torch)."""
        chat = parse_request(body)
        turns, image = conversation(chat.messages, multimodal=bool(loaded.config.visual_len))
        prompt = len(encode_dialog(loaded, turns))
        room = context - prompt
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt} tokens, but the model's context is {context} tokens: "
                                f"shorten the conversation", param="messages", code="context_length_exceeded")
        asked = chat.max_completion_tokens or chat.max_tokens
        if asked is not None and asked > room:
            which = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{which} is {asked}, but the prompt is {prompt} tokens of the model's {context}: "
                                f"at most {room} new tokens fit", param=which, code="context_length_exceeded")
        given = dict(temperature=chat.temperature, top_p=chat.top_p, top_k=chat.top_k,
                     repetition_penalty=chat.repetition_penalty)
        sampling = Sampling(**{k: v for k, v in given.items() if v is not None},
                            max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, room), seed=chat.seed)
        return chat, turns, image, sampling

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        chat, turns, image, sampling = await asyncio.to_thread(prepare, await read_body(request))
        job = Job(turns, image, sampling, StopCut(chat.stop), asyncio.get_running_loop())
        engine.submit(job)
        reply = Completion(model_id)
        watcher = asyncio.create_task(until_disconnected(request))
        streaming = False
        try:
            event = await next_event(job, watcher)
            if isinstance(event, ApiError):
                raise event
            if chat.stream:
                streaming = True  # from here StreamingResponse watches for the disconnect, and sse() cancels
                include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
                return StreamingResponse(sse(job, event, reply, include_usage), media_type="text/event-stream")
            text = ""
            while isinstance(event, Delta):
                text += event.text
                event = await next_event(job, watcher)
            if isinstance(event, ApiError):
                raise event
            return reply.whole(text, event)
        except ClientLeft:
            return Response(status_code=499)  # nobody reads it
        finally:
            watcher.cancel()
            if not streaming:
                engine.cancel(job)

    async def sse(job: Job, event: Event, reply: Completion, include_usage: bool) -> AsyncIterator[str]:
        extra = {"usage": None} if include_usage else {}
        try:
            yield reply.chunk({"delta": {"role": "assistant", "content": ""}}, **extra)
            while isinstance(event, Delta):
                yield reply.chunk({"delta": {"content": event.text}}, **extra)
                event = await job.events.get()
            if isinstance(event, ApiError):  # after the 200 has gone out: an error event, as OpenAI sends
                yield f"data: {json.dumps(event.body())}\n\n"
                return
            yield reply.chunk({"delta": {}, "finish_reason": event.finish}, **extra)
            if include_usage:
                yield reply.chunk(None, usage=event.usage)
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: StreamingResponse cancels this generator
            engine.cancel(job)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.counts()}

    return app


# --- running it --------------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: a free one), or one clear line why not."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Lav2Error(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or "
                        f"--host") from None
    sock.listen(128)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server; when it shuts down (Ctrl-C), the app's open answers end first, so that their connections
    close at once rather than after the grace time."""

    async def shutdown(self, sockets=None) -> None:
        self.config.app.state.engine.stop()
        await super().shutdown(sockets)


def server(app: FastAPI, *, log_level: str = "info") -> Server:
    return Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """The app served from a background thread while the block runs (for the bench and the tests); yields its
    base URL. Leaving the block stops the server as Ctrl-C does."""
    sock = listen(host, port)
    uv = server(app, log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="lav2-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise Lav2Error(f"the server on {address(sock)} did not start")
        time.sleep(0.01)
    try:
        yield address(sock)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(*, model_dir: Optional[Path] = None, host: str = "127.0.0.1", port: int = 8000,
        api_key: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
        quantize: Optional[str] = None, max_batch: int = 8, max_queue: int = 32) -> None:
    """Serve the model in `model_dir` over the OpenAI chat-completions API until Ctrl-C."""
    from lav2.chat import load_model

    if api_key is not None and not api_key.strip():
        raise Lav2Error("the API key is empty: give a key, or leave --api-key and $LAV2_API_KEY unset for none")
    sock = listen(host, port)  # a taken port fails before the model loads
    loaded = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    app = create_app(loaded, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    card = model_card(loaded)
    print(f"lav2 serve: {loaded.folder} (model id {card['id']!r}, {card['layout']}, {card['prompt_style']} "
          f"prompts, {card['context_length']} tokens of context{', images' if card['multimodal'] else ''}) at "
          f"{address(sock)}/v1{'' if api_key else ', no API key'}. Ctrl-C to stop.", flush=True)
    if not is_loopback(host) and not api_key:
        print(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model "
              f"(set --api-key or $LAV2_API_KEY)", flush=True)
    server(app).run(sockets=[sock])
