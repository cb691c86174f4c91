"""`lav2 chat`: --prompt, the REPL through a pipe and a pseudo-terminal, its commands, and bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_image
from lav2 import chat, checkpoint, fastpath
from lav2.cli import main
from lav2.errors import Lav2Error
from lav2.generate import Conversation, Sampling, answer
from test_generate import make_lively_folder

SETTINGS = ["--temperature", "0", "--max-new-tokens", "12"]
GREEDY = dict(temperature=0, max_new_tokens=12)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tiny_official, tmp_path_factory) -> Path:
    return make_lively_folder(tiny_official[1], tmp_path_factory.mktemp("chat") / "official")


@pytest.fixture(scope="module")
def loaded(folder):
    return checkpoint.load(folder, "cpu", torch.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    return {"red": make_image(root / "red.png"), "blue": make_image(root / "blue.png", colour=(20, 40, 220))}


def lav2(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lav2.cli", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def invoke(*args: str, **env):
    return CliRunner(env=env).invoke(main, ["chat", *args])


def test_prompt_prints_only_the_answer(folder, loaded, images):
    result = invoke("--model", str(folder), "--image", str(images["red"]), "--prompt", "What colour?", *SETTINGS)
    assert result.exit_code == 0, result.output
    assert result.stdout == answer(loaded, "What colour?", image=images["red"], **GREEDY) + "\n"


def expected_pipe_session(loaded, images) -> str:
    """What the piped session below must print: its three answers, computed in process."""
    conversation = Conversation(loaded, Sampling(**GREEDY))
    conversation.set_image(images["red"])
    first = "".join(conversation.ask("What colour is the shape?"))
    conversation.set_image(images["blue"])
    second = "".join(conversation.ask("And now?"))
    third = answer(loaded, "Last question?", image=images["blue"], **GREEDY)
    return f"{first}\n{second}\n{third}\n"


def test_piped_multi_turn_session_with_commands(folder, loaded, images, tmp_path):
    lines = ["What colour is the shape?", f"/image {images['blue']}", "And now?", "/reset",
             f"/save {tmp_path / 'chat.json'}", f"/save {tmp_path / 'chat.md'}", "/bogus",
             f"/image {tmp_path / 'missing.png'}", "", "Last question?", "/quit", "never read"]
    result = lav2("chat", "--model", str(folder), "--image", str(images["red"]), *SETTINGS,
                  stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_pipe_session(loaded, images)
    assert "error: unknown command /bogus" in result.stderr
    assert "missing.png: no such image file" in result.stderr
    entries = json.loads((tmp_path / "chat.json").read_text())["entries"]
    assert [next(iter(e)) for e in entries] == ["image", "user", "image", "user", "reset"]
    assert entries[1]["user"] == "What colour is the shape?" and entries[2]["image"] == str(images["blue"])
    markdown = (tmp_path / "chat.md").read_text()
    assert "**You:** What colour is the shape?" in markdown and "*New conversation*" in markdown


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Terminal:
    """`lav2 chat` on a pseudo-terminal: the child sees a tty on stdin and stdout, as a person's shell gives."""

    def __init__(self, *args: str):
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "lav2.cli", "chat", *args], stdin=child, stdout=child,
                                     stderr=child, cwd=REPO, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm"})
        os.close(child)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60) -> str:
        """Output up to and including the next `text` (ANSI codes and \\r removed)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} in {timeout}s; the terminal shows: {self.seen[-2000:]!r}")
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended before {text!r}; the terminal shows: {self.seen[-2000:]!r}")
            self.seen += ANSI.sub("", chunk.decode("utf-8", "replace")).replace("\r", "")
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def ctrl_d(self) -> int:
        """Press Ctrl-D until the chat leaves; its exit code. (One pressed just as readline sets up the terminal can
        be lost, a race a person typing never meets.)"""
        for _ in range(20):
            self.send("\x04")
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=3)
                os.close(self.fd)
                return code
        raise AssertionError(f"Ctrl-D did not end the chat; the terminal shows: {self.seen[-2000:]!r}")


def test_terminal_session_streams_answers_and_takes_commands(folder, loaded, images, tmp_path):
    term = Terminal("--model", str(folder), "--image", str(images["red"]), *SETTINGS)
    term.read_until("you>")
    term.send("What colour is the shape?\n")
    shown = term.read_until("you>")
    expected = chat.CONTROL.sub("", answer(loaded, "What colour is the shape?", image=images["red"], **GREEDY))
    assert f"lav2> {expected}\n" in shown
    term.send(f"/image {images['blue']}\n")
    assert "image: " in term.read_until("you>")
    term.send("/nope\n")
    assert "unknown command /nope" in term.read_until("you>")
    term.send("/reset\n")
    assert "new conversation" in term.read_until("you>")
    term.send(f"/save {tmp_path / 'chat.md'}\n")
    assert "transcript saved" in term.read_until("you>")
    assert term.ctrl_d() == 0
    assert "**You:** What colour is the shape?" in (tmp_path / "chat.md").read_text()


class InterruptingFile(io.StringIO):
    """A terminal where the user presses Ctrl-C while the third piece of an answer is being written."""

    def __init__(self):
        super().__init__()
        self.pieces = 0

    def write(self, text: str) -> int:
        if self.pieces == 2:
            self.pieces += 1
            raise KeyboardInterrupt
        self.pieces += 1
        return super().write(text)


def test_ctrl_c_stops_the_answer_and_the_repl_goes_on(loaded, monkeypatch):
    from rich.console import Console

    ui = chat.TerminalUI()
    ui.console = Console(file=InterruptingFile(), force_terminal=False, width=200)
    lines = iter(["Tell me about circles.", "And squares?"])

    def read() -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    monkeypatch.setattr(ui, "read", read)
    session = chat.Session(Conversation(loaded, Sampling(temperature=0, max_new_tokens=30)))
    chat.Repl(session, ui).loop()
    shown = ui.console.file.getvalue()
    assert "(stopped)" in shown
    turns = session.conversation.turns
    assert [t.user for t in turns] == ["Tell me about circles.", "And squares?"]  # the REPL went on
    full = answer(loaded, "Tell me about circles.", temperature=0, max_new_tokens=30)
    assert turns[0].assistant and full.startswith(turns[0].assistant) and len(turns[0].assistant) < len(full)


def test_the_user_is_told_when_old_turns_are_dropped(loaded, capsys):
    small = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, max_seq_len=256))
    session = chat.Session(Conversation(small, Sampling(temperature=0, max_new_tokens=20)))
    lines = io.StringIO("".join(f"{i}: a red circle\n" for i in range(6)))
    chat.Repl(session, chat.PipeUI(lines, io.StringIO())).loop()
    assert "oldest turn(s) no longer fit the model's context of 256 tokens" in capsys.readouterr().err
    assert len(session.transcript) == 6  # the transcript keeps every turn


def test_ocr_expert_text_reaches_the_prompt(loaded, tmp_path):
    pytest.importorskip("pytesseract")
    from PIL import Image, ImageDraw, ImageFont

    from lav2.experts import load_experts

    image = Image.new("RGB", (400, 90), "white")
    ImageDraw.Draw(image).text((30, 20), "OPEN 24H", fill="black", font=ImageFont.load_default(size=40))
    image.save(tmp_path / "sign.png")
    session = chat.Session(Conversation(loaded, Sampling(**GREEDY)), load_experts(["ocr"]))
    session.set_image(tmp_path / "sign.png")
    "".join(session.ask("What does the sign say?"))
    prompt = loaded.tokenizer.decode(session.conversation._cached)  # what the model was given
    assert "### Input: Text in the image: OPEN 24H ### Response:" in " ".join(prompt.split())


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_input_is_one_clear_line_and_a_non_zero_exit(folder, tiny_base, images, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(make_image(tmp_path / "big.png", size=300).read_bytes()[:400])
    model = ["--model", str(folder)]
    assert "no such image file" in error_line(invoke(*model, "--image", str(tmp_path / "nope.png")))
    assert "not an image" in error_line(invoke(*model, "--image", str(tmp_path / "notes.txt")))
    assert "corrupt or truncated" in error_line(invoke(*model, "--image", str(tmp_path / "cut.png")))
    assert "one image per conversation" in error_line(
        invoke(*model, "--image", str(images["red"]), "--image", str(images["blue"])))
    assert "no such model folder" in error_line(invoke("--model", str(tmp_path / "none"), "--prompt", "hi"))
    assert "`lav2 download 7b`" in error_line(invoke("--prompt", "hi", LAV2_HOME=str(tmp_path)))
    assert "text-only model" in error_line(
        invoke("--model", str(tiny_base[1]), "--image", str(images["red"]), "--prompt", "hi"))
    assert "top-p" in error_line(invoke(*model, "--top-p", "0", "--prompt", "hi"))
    assert "unknown expert" in error_line(invoke(*model, "--expert", "vqa", "--prompt", "hi"))


def test_repl_reports_bad_input_in_one_line_and_goes_on(tiny_base, images, tmp_path, capsys):
    text_only = checkpoint.load(tiny_base[1], "cpu", torch.float32)
    session = chat.Session(Conversation(text_only, Sampling(**GREEDY)))
    lines = io.StringIO(f"/image {images['red']}\n/image\n/save {tmp_path / 'no' / 'such' / 'dir.md'}\nhi\n")
    out = io.StringIO()
    chat.Repl(session, chat.PipeUI(lines, out)).loop()
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)
    assert "text-only model" in errors[0] and "needs a file name" in errors[1] and "cannot write" in errors[2]
    assert out.getvalue() == answer(text_only, "hi", **GREEDY) + "\n"


def test_quantize_int8_answers_on_cpu(folder):
    result = invoke("--model", str(folder), "--quantize", "int8", "--prompt", "hi", *SETTINGS)
    assert result.exit_code == 0, result.output


def test_8bit_without_bitsandbytes_is_a_clear_error(loaded, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(Lav2Error, match="bitsandbytes"):
        fastpath.quantize_8bit_(checkpoint.load(loaded.folder, "cpu", torch.float32).model)
