"""`lav2 serve`: the OpenAI chat-completions API, spoken to with the official `openai` client (and raw HTTP where
the client cannot send what is tested), over tiny model folders on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from conftest import random_llama, write_meta_folder
import lav2
from lav2 import checkpoint, serve
from lav2.cli import main
from lav2.generate import Sampling, answer_batch, encode_dialog, stream_batch
from lav2.model import Config
from lav2.prompts import Turn
from test_generate import make_lively_folder

REPO = Path(__file__).resolve().parents[1]
GREEDY = dict(temperature=0, max_tokens=12)
KEY = "sk-test-key"


# --- model folders and servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tiny_official, tmp_path_factory) -> Path:
    """A multimodal folder (the official layout, Alpaca prompts) whose answers depend on the prompt and image."""
    return make_lively_folder(tiny_official[1], tmp_path_factory.mktemp("serve") / "official")


@pytest.fixture(scope="module")
def reference(folder):
    """The same model loaded apart from the server's: expected answers are computed here, never on the server's
    model (which its worker thread owns)."""
    return lav2.load(folder, "cpu", torch.float32)


@pytest.fixture(scope="module")
def url(folder):
    app = serve.create_app(checkpoint.load(folder, "cpu", torch.float32), max_batch=4, max_queue=8)
    with serve.serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def long_folder(tokenizer_path, tmp_path_factory) -> Path:
    """A text-only model with a long context whose random weights repeat one token and never say eos: an answer
    of max_tokens runs for seconds, long enough to watch the queue while it runs."""
    root = tmp_path_factory.mktemp("long")
    meta = write_meta_folder(root / "meta", random_llama(Config.from_name("tiny")), tokenizer_path)
    folder = checkpoint.import_model(meta, root / "long")
    info = json.loads((folder / "lav2.json").read_text())
    info["config"]["max_seq_len"] = 4096  # Meta's params.json does not say: the importer assumes 2048
    (folder / "lav2.json").write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module")
def keyed_url(long_folder):
    """The long text-only model with an API key, one row per batch and one waiting place."""
    app = serve.create_app(checkpoint.load(long_folder, "cpu", torch.float32), api_key=KEY, max_batch=1,
                           max_queue=1)
    with serve.serving(app) as base:
        yield base


def png_data_url(colour=(200, 30, 30), size: int = 48) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(colour, size)).decode()


def png_bytes(colour=(200, 30, 30), size: int = 48) -> bytes:
    image = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> str:
    """A data URL of a PNG header that announces width x height pixels and holds none, as a bomb starts."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")).decode()


def user_with_image(text: str, image_url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": image_url}}]}


def expected(loaded, dialog: list[Turn], image=None, max_new_tokens: int = 12) -> str:
    return answer_batch(loaded, [dialog], images=[image], sampling=Sampling(temperature=0,
                                                                            max_new_tokens=max_new_tokens))[0]


def request(base: str, method: str, path: str, body: bytes | dict | None = None, *,
            key: str | None = None) -> tuple[int, dict]:
    """Raw HTTP, for what the openai client will not send (malformed JSON, wrong types, no key)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def open_stream(base: str, body: dict, *, key: str | None = None) -> tuple[http.client.HTTPConnection,
                                                                            http.client.HTTPResponse]:
    """A streaming request whose response is read by the caller, event by event."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    return conn, conn.getresponse()


def hang_up(conn: http.client.HTTPConnection) -> None:
    """Close the connection as a client that goes away does."""
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def health(base: str) -> dict:
    status, body = request(base, "GET", "/health")
    assert status == 200
    return body


def assert_openai_error(status: int, body: dict, expected_status: int, fragment: str) -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    message = body["error"]["message"]
    assert fragment in message and "\n" not in message, message
    assert body["error"]["type"] == ("invalid_request_error" if expected_status < 500 else "server_error")


# --- answers ------------------------------------------------------------------------------------------------


def test_a_plain_completion_is_the_models_greedy_answer_in_openais_shape(client, reference, folder):
    question = "What colour is the shape?"
    done = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": question}],
                                          **GREEDY)
    want = expected(reference, [Turn(question)])
    assert done.choices[0].message.content == want == reference.generate(question, temperature=0, max_new_tokens=12)
    assert done.id.startswith("chatcmpl-") and done.object == "chat.completion" and done.model == folder.name
    assert done.choices[0].message.role == "assistant" and len(done.choices) == 1
    prompt = len(encode_dialog(reference, [Turn(question)]))
    assert done.usage.prompt_tokens == prompt
    assert done.usage.total_tokens == prompt + done.usage.completion_tokens
    assert done.choices[0].finish_reason == ("length" if done.usage.completion_tokens == 12 else "stop")
    assert abs(done.created - time.time()) < 600


def test_an_image_as_a_data_url_is_the_conversations_image(client, reference):
    question = "What colour is the shape?"
    done = client.chat.completions.create(model="m", messages=[user_with_image(question, png_data_url())], **GREEDY)
    red = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    assert done.choices[0].message.content == expected(reference, [Turn(question)], red)
    assert done.choices[0].message.content != expected(reference, [Turn(question)])  # the image was seen


def test_a_streamed_answer_is_openais_chunks_and_ends_with_done(url, client, reference):
    question = "Describe the picture."
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": question}], stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(reference, [Turn(question)])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1  # the usage chunk, last
    conn, response = open_stream(url, {"messages": [{"role": "user", "content": question}], **GREEDY})
    try:  # on the wire: server-sent events, the last one [DONE]
        assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    finally:
        conn.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_multi_turn_messages_are_the_turns_lav2_chat_renders(client, reference):
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]},
                {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": "And what colour?"}]
    done = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    turns = [Turn("Answer briefly.\n\nWhat shape is it?", "A circle."), Turn("And what colour?")]
    assert done.choices[0].message.content == expected(reference, turns)
    assert done.usage.prompt_tokens == len(encode_dialog(reference, turns))


def test_a_stop_string_cuts_the_answer_before_it_streamed_or_not(client, reference):
    question = "Tell me about circles."
    full = expected(reference, [Turn(question)], max_new_tokens=24)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(full) >= 6 and stop.strip(), full  # the model says enough for a stop string in the middle
    messages = [{"role": "user", "content": question}]
    done = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24, stop=[stop])
    assert done.choices[0].message.content == full[:full.index(stop)]
    assert done.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24, stop=stop,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:full.index(stop)]


def test_a_seed_reproduces_a_sampled_answer(client):
    ask = dict(model="m", messages=[{"role": "user", "content": "Say something."}], temperature=1.0, top_p=1.0,
               max_tokens=16)
    first, second = (client.chat.completions.create(**ask, seed=7).choices[0].message.content for _ in range(2))
    assert first == second


def test_eight_concurrent_streams_all_get_their_own_answer_in_batches(client, reference, monkeypatch):
    questions = [f"What is shape number {i}?" for i in range(8)]
    want = [expected(reference, [Turn(q)], max_new_tokens=16) for q in questions]
    batches: list[int] = []

    def counted(loaded, dialogs, **kwargs):  # the real stream_batch, noting each batch's size
        batches.append(len(dialogs))
        return stream_batch(loaded, dialogs, **kwargs)

    monkeypatch.setattr(serve, "stream_batch", counted)
    got: dict[int, str] = {}
    failures: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": questions[i]}],
                                                    temperature=0, max_tokens=16, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except BaseException as e:  # reported by the test thread
            failures.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "some streams did not finish in 120 s"
    assert not failures, failures
    assert [got.get(i) for i in range(8)] == want
    assert sum(batches) == 8 and max(batches) <= 4 and max(batches) > 1, batches  # waiting requests run together


def test_max_completion_tokens_limits_the_answer_as_max_tokens_does(client, reference):
    done = client.chat.completions.create(model="m", messages=USER, temperature=0, max_completion_tokens=3)
    assert done.usage.completion_tokens <= 3
    assert done.choices[0].message.content == expected(reference, [Turn("hi")], max_new_tokens=3)


def test_models_lists_the_folder_with_its_metadata_and_health_answers(url, client, folder, reference):
    assert [m.id for m in client.models.list().data] == [folder.name]
    status, body = request(url, "GET", "/v1/models")
    card = body["data"][0]
    assert status == 200 and card["object"] == "model"
    assert (card["layout"], card["prompt_style"], card["context_length"], card["multimodal"]) == (
        reference.info["layout"], "alpaca", reference.config.max_seq_len, True)
    assert health(url)["status"] == "ok" and health(url)["model"] == folder.name


# --- bad requests -------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


def long_text() -> str:
    return " ".join(["The quick brown fox jumps over the lazy dog."] * 60)


BAD = {
    "malformed JSON": (b'{"messages": [', 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "must be a JSON object"),
    "no messages": ({"model": "m"}, 400, "messages: Field required"),
    "no message at all": ({"messages": []}, 400, "messages: List should have at least 1 item"),
    "messages not a list": ({"messages": "hi"}, 400, "messages: Input should be a valid list"),
    "temperature a string": ({"messages": USER, "temperature": "0.5"}, 400, "temperature: Input should be a valid number"),
    "temperature too high": ({"messages": USER, "temperature": 3}, 400, "temperature: Input should be less than"),
    "max_tokens a float": ({"messages": USER, "max_tokens": 2.5}, 400, "max_tokens: Input should be a valid integer"),
    "stream a number": ({"messages": USER, "stream": 1}, 400, "stream: Input should be a valid boolean"),
    "stop a number": ({"messages": USER, "stop": 5}, 400, "stop: Input should be a valid list"),
    "five stop strings": ({"messages": USER, "stop": list("abcde")}, 400, "stop: Value should have at most 4 items"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role: Input should be"),
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, 400,
                         "messages[0].content: content must be a string or a list of content parts"),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
                          "messages[0].content[0].type: Input should be 'text' or 'image_url'"),
    "text part without text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
                               "needs a 'text' field"),
    "n=2": ({"messages": USER, "n": 2}, 400, "only n=1 is supported"),
    "ends with the assistant": ({"messages": [*USER, {"role": "assistant", "content": "yo"}]}, 400,
                                "the last message must be a user message"),
    "two users in a row": ({"messages": USER * 2}, 400, "must alternate user and assistant"),
    "a late system message": ({"messages": [*USER, {"role": "system", "content": "x"}, *USER]}, 400,
                              "system messages are taken only at the start"),
    "remote image": ({"messages": [user_with_image("hi", "https://example.com/cat.png")]}, 400,
                     "remote image URLs are not fetched"),
    "unknown scheme": ({"messages": [user_with_image("hi", "file:///etc/passwd")]}, 400,
                       "unsupported image URL scheme 'file'"),
    "not base64": ({"messages": [user_with_image("hi", "data:image/png;base64,@@@@")]}, 400, "not valid base64"),
    "not an image": ({"messages": [user_with_image("hi", "data:image/png;base64,"
                                                   + base64.b64encode(b"plain text").decode())]}, 400,
                     "the image does not decode: not a format Pillow reads"),
    "a truncated image": ({"messages": [user_with_image("hi", "data:image/png;base64," + base64.b64encode(
        png_bytes(size=300)[:300]).decode())]}, 400, "corrupt or truncated"),
    "too many pixels": ({"messages": [user_with_image("hi", png_claiming(4100, 4100))]}, 400,
                        "more than 16,777,216 pixels; send a smaller one (4100 x 4100)"),
    "a decompression bomb": ({"messages": [user_with_image("hi", png_claiming(30000, 30000))]}, 400,
                             "more than 16,777,216 pixels"),
    "two images": ({"messages": [user_with_image("a", png_data_url()), {"role": "assistant", "content": "b"},
                                 user_with_image("c", png_data_url((0, 0, 200)))]}, 400,
                   "2 images in the messages, but the model takes one image per conversation"),
    "an image from the assistant": ({"messages": [*USER, user_with_image("a", png_data_url()) | {"role": "assistant"},
                                                  *USER]}, 400, "images go in user messages only"),
    "a too large image": ({"messages": [user_with_image("hi", "data:image/png;base64," + base64.b64encode(
        bytes(11 * 2**20)).decode())]}, 400, "the image file is larger than 10 MiB"),
    "too many messages": ({"messages": [*[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
                                        * 128, *USER]}, 400, "messages: List should have at most 256 items"),
    "too long a prompt": ({"messages": [{"role": "user", "content": long_text()}]}, 400,
                          "tokens, but the model's context is"),
    "too many new tokens": ({"messages": USER, "max_tokens": 10**6}, 400, "max_tokens is 1000000, but the prompt is"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_4xx_in_openais_error_shape_and_the_server_goes_on(url, case):
    body, status, fragment = BAD[case]
    assert_openai_error(*request(url, "POST", "/v1/chat/completions", body), status, fragment)
    status, done = request(url, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
    assert status == 200 and done["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_sees_bad_requests_as_its_own_errors(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=USER, n=2)
    assert refused.value.status_code == 400 and "only n=1" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": long_text()}])


def test_a_too_large_body_is_413_and_unknown_routes_are_openai_errors(url):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (serve.MAX_BODY_BYTES + 10)}]}).encode()
    assert_openai_error(*request(url, "POST", "/v1/chat/completions", huge), 413, "larger than 20 MiB")
    assert_openai_error(*request(url, "GET", "/v1/nothing"), 404, "Not Found")
    assert_openai_error(*request(url, "GET", "/v1/chat/completions"), 405, "Method Not Allowed")
    assert health(url)["status"] == "ok"


def test_unknown_fields_are_ignored_and_lav2_extras_are_taken(client, reference):
    done = client.chat.completions.create(model="m", messages=USER, **GREEDY, user="someone",
                                          extra_body={"top_k": 1, "repetition_penalty": 1.0, "vendor_thing": [1]})
    assert done.choices[0].message.content == expected(reference, [Turn("hi")])


# --- keys, the queue, and clients that leave ---------------------------------------------------------------


def test_with_an_api_key_requests_need_it(keyed_url):
    body = {"messages": USER, "max_tokens": 2}
    assert_openai_error(*request(keyed_url, "POST", "/v1/chat/completions", body), 401, "API key")
    assert_openai_error(*request(keyed_url, "POST", "/v1/chat/completions", body, key="sk-wrong"), 401, "API key")
    assert_openai_error(*request(keyed_url, "GET", "/v1/models"), 401, "API key")
    keyed = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert keyed.chat.completions.create(model="m", messages=USER, max_tokens=2).choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert health(keyed_url)["status"] == "ok"  # no key needed to see that it is up


def test_an_image_for_a_text_only_model_is_refused(keyed_url):
    body = {"messages": [user_with_image("hi", png_data_url())]}
    assert_openai_error(*request(keyed_url, "POST", "/v1/chat/completions", body, key=KEY), 400, "text-only model")


def test_a_full_queue_is_503_and_clients_that_leave_free_their_place(keyed_url):
    """One row per batch and one waiting place: A runs, B waits, C is refused; B's client leaves and its place is
    free at once; A's client leaves mid-stream and the next request runs at once."""
    before = health(keyed_url)
    long = {"messages": USER, "temperature": 0, "max_tokens": 3500}
    a_conn, a = open_stream(keyed_url, long, key=KEY)
    assert a.status == 200 and a.readline().startswith(b"data: ")  # A is decoding
    parts = urlsplit(keyed_url)
    b_conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    b_conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": USER, "max_tokens": 2}).encode(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    wait_for(lambda: health(keyed_url)["waiting"] == 1, "B waits")
    refused = request(keyed_url, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2}, key=KEY)
    assert_openai_error(*refused, 503, "busy")
    hang_up(b_conn)
    wait_for(lambda: health(keyed_url)["waiting"] == 0, "B's place is freed")
    assert health(keyed_url)["running"] == 1, "A is still decoding"
    hang_up(a_conn)
    status, done = request(keyed_url, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2}, key=KEY)
    assert status == 200
    wait_for(lambda: health(keyed_url)["running"] == 0, "the worker is idle")
    after = health(keyed_url)
    # B dropped before it ran, and A's row cancelled: had A run its 3500 tokens, it would count as completed
    assert after["cancelled"] - before["cancelled"] == 2
    assert after["completed"] - before["completed"] == 1


# --- the command ---------------------------------------------------------------------------------------------


def test_serve_prints_the_address_answers_and_stops_cleanly_on_ctrl_c(folder):
    proc = subprocess.Popen([sys.executable, "-m", "lav2.cli", "serve", "--model", str(folder), "--port", "0",
                             "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "LAV2_API_KEY": ""})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no startup line in 120 s"
        line = proc.stdout.readline()
        assert line.startswith(f"lav2 serve: {folder}") and "http://127.0.0.1:" in line, line
        base = line.split(" at ")[1].split("/v1")[0]
        wait_for(lambda: _up(base), "the server answers", timeout=60)
        status, done = request(base, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2})
        assert status == 200 and done["model"] == folder.name
        conn, stream = open_stream(base, {"messages": USER, "max_tokens": 1500})
        assert stream.readline().startswith(b"data: ")  # an answer is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        try:
            rest = stream.read().decode()
        except http.client.IncompleteRead as cut:  # the server dropped the connection mid-answer
            rest = cut.partial.decode()
        conn.close()
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    # the open answer was ended and its client told, not cut off after uvicorn's grace time
    assert '"message": "the server is shutting down"' in rest


def _up(base: str) -> bool:
    try:
        return health(base)["status"] == "ok"
    except OSError:
        return False


def test_a_taken_port_is_one_clear_line(folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--model", str(folder), "--port", str(port)])
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot listen on 127.0.0.1:"), result.output


def test_bench_serve_reports_throughput_and_time_to_first_token():
    done = subprocess.run([sys.executable, "-m", "lav2.bench", "serve", "--config", "tiny", "--clients", "1,2",
                           "--requests", "4", "--max-tokens", "8"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["benchmark"] == "serve" and set(result["clients"]) == {"1", "2"}
    for figures in result["clients"].values():
        assert figures["requests"] == 4 and figures["requests_per_s"] > 0 and figures["completion_tokens_per_s"] > 0
        assert 0 < figures["time_to_first_token_s_median"] < figures["seconds"]
