"""`lav2 chat`: answer one prompt, or hold a multi-turn conversation about an image in the terminal.

On a terminal: a rich REPL with streamed answers and the commands of HELP. Through a pipe: each input line is a
turn and each answer one block of plain text on stdout (notes and errors go to stderr), so scripts can drive it.
All of it runs through generate.Conversation, the same code path as `Loaded.generate`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence, TextIO


from lav2.checkpoint import write_text_atomic
from lav2.errors import Lav2Error
from lav2.images import open_image
from lav2.generate import Conversation, Sampling

HELP = """\
/image PATH   show the model this image from now on (the conversation goes on)
/reset        start a new conversation (the image stays)
/save FILE    write the transcript: FILE.json as JSON, any other name as Markdown
/help         this list
/quit         leave (Ctrl-D too); Ctrl-C stops an answer"""

# Control characters other than newline and tab: a model's bytes must not reach the terminal as escape sequences.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")



def default_model_dir() -> Path:
    from lav2.download import lav2_home

    return lav2_home() / "7b"


# --- loading -----------------------------------------------------------------------------------------------


def load_model(model_dir: Optional[Path], *, device: Optional[str], dtype: Optional[str], quantize: Optional[str]):
    """The folder to chat with (default: the downloaded 7b), loaded for inference in what fits (memory.py)."""
    from lav2.checkpoint import DTYPES, load

    if model_dir is None:
        model_dir = default_model_dir()
        if not model_dir.exists():
            raise Lav2Error(f"no model at {model_dir} (the default): it is not downloaded yet; run "
                            f"`lav2 download 7b`, or give a model folder with --model DIR")
    loaded = load(model_dir, device=device, dtype=DTYPES[dtype] if dtype else None, quantize=quantize)
    if loaded.memory_note:  # the dtype was chosen to fit: say so before the first answer
        print(loaded.memory_note, file=sys.stderr)
    return loaded


# --- the one-shot and the REPL -----------------------------------------------------------------------------


def run(*, model_dir: Optional[Path] = None, images: Sequence[Path] = (), prompt: Optional[str] = None,
        device: Optional[str] = None, dtype: Optional[str] = None, quantize: Optional[str] = None,
        experts: Sequence[str] = (), sampling: Sampling = Sampling(), compile: bool = False,
        stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> None:
    """Chat with the model in `model_dir` about one image: answer `prompt` and print only the answer, else a
    REPL (rich on a terminal, one turn per line through a pipe)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if len(images) > 1:
        raise Lav2Error(f"{len(images)} images given, but the model takes one image per conversation: give one "
                        f"--image (and change it with /image PATH in the chat)")
    pictures = [open_image(path) for path in images]  # a bad file fails before the model loads
    loaded = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    from lav2.experts import load_experts

    device = loaded.model.tok_embeddings.weight.device
    session = Session(Conversation(loaded, sampling, compile=compile), load_experts(experts, device=device))
    if pictures:
        session.set_image(images[0], pictures[0])
    if prompt is not None:
        write_stream(stdout, session.ask(prompt))
        stdout.write("\n")
        return
    ui = TerminalUI() if stdin.isatty() and stdout.isatty() else PipeUI(stdin, stdout)
    Repl(session, ui).loop()


class Session:
    """A conversation plus what the user sees of it: the transcript (every turn, also those trimmed from the
    model's history, and every image change), the current image's path, and the experts."""

    def __init__(self, conversation: Conversation, experts: Sequence = ()):
        self.conversation, self.experts = conversation, list(experts)
        self.image_path: Optional[Path] = None
        self.transcript: list[dict] = []

    def set_image(self, path: Path, picture=None) -> None:
        from lav2.experts import describe

        picture = open_image(path) if picture is None else picture
        context = describe(self.experts, picture) if self.experts else None
        self.conversation.set_image(picture, context=context)
        self.image_path = Path(path)
        self.transcript.append({"image": str(path), **({"context": context} if context else {})})

    def ask(self, text: str) -> Iterator[str]:
        last = self.conversation.turns[-1] if self.conversation.turns else None
        try:
            yield from self.conversation.ask(text)
        finally:  # a stopped answer joined the history as far as it got; a refused message did not
            turns = self.conversation.turns
            if turns and turns[-1] is not last:
                self.transcript.append({"user": text, "assistant": turns[-1].assistant})

    def reset(self) -> None:
        self.conversation.reset()
        self.transcript.append({"reset": True})

    def save(self, path: Path) -> None:
        """JSON for *.json, Markdown otherwise; written to a temporary file and renamed, never half-written."""
        path = Path(path).expanduser()
        loaded = self.conversation.loaded
        if path.suffix.lower() == ".json":
            text = json.dumps({"model": str(loaded.folder), "entries": self.transcript}, indent=2,
                              ensure_ascii=False) + "\n"
        else:
            text = transcript_markdown(str(loaded.folder), self.transcript)
        try:
            write_text_atomic(path, text)
        except OSError as e:
            raise Lav2Error(f"cannot write the transcript to {path}: {e.strerror or e}") from None


def transcript_markdown(model: str, entries: list[dict]) -> str:
    lines = ["# lav2 chat", "", f"Model: `{model}`", ""]
    for entry in entries:
        if "image" in entry:
            lines += [f"*Image: `{entry['image']}`*", ""]
            if entry.get("context"):
                lines += [f"> {line}" for line in entry["context"].splitlines()] + [""]
        elif entry.get("reset"):
            lines += ["---", "*New conversation*", ""]
        else:
            lines += [f"**You:** {entry['user']}", "", f"**Assistant:** {entry['assistant']}", ""]
    return "\n".join(lines)


def write_stream(out: TextIO, pieces: Iterator[str]) -> None:
    for piece in pieces:
        out.write(piece)
        out.flush()


class Repl:
    """Lines in, answers out; commands start with "/". Errors are reported and the REPL goes on."""

    def __init__(self, session: Session, ui):
        self.session, self.ui = session, ui

    def loop(self) -> None:
        self.ui.welcome(self.session)
        while True:
            try:
                line = self.ui.read().strip()
            except EOFError:  # Ctrl-D, or the end of piped input
                self.ui.bye()
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
                self.ui.note("(Ctrl-D or /quit to leave)")
                continue
            if not line:
                continue
            try:
                if not self.handle(line):
                    return
            except Lav2Error as e:
                self.ui.error(str(e))
            except KeyboardInterrupt:  # Ctrl-C stops the answer (or a slow expert), not the chat
                self.ui.note("(stopped)")

    def handle(self, line: str) -> bool:
        """Act on one line; False to leave."""
        command, _, arg = line.partition(" ")
        arg = arg.strip().strip("'\"")
        if not line.startswith("/"):
            self.answer(line)
        elif command in ("/quit", "/exit"):
            self.ui.bye()
            return False
        elif command == "/help":
            self.ui.note(HELP)
        elif command == "/reset":
            self.session.reset()
            image = self.session.image_path
            self.ui.note("new conversation" + (f" (image: {image})" if image else ""))
        elif command in ("/image", "/save") and not arg:
            self.ui.error(f"{command} needs a file name: {command} PATH")
        elif command == "/image":
            self.session.set_image(Path(arg))
            self.ui.note(f"image: {arg}; the conversation goes on with it (/reset to start over)")
        elif command == "/save":
            self.session.save(Path(arg))
            self.ui.note(f"transcript saved to {arg}")
        else:
            self.ui.error(f"unknown command {command}; /help lists the commands")
        return True

    def answer(self, text: str) -> None:
        pieces = self.session.ask(text)
        try:
            self.ui.stream(pieces)
        finally:  # after Ctrl-C: the answer so far joins the history now, not whenever the generator is collected
            pieces.close()
        conversation = self.session.conversation
        if conversation.dropped:
            self.ui.note(f"(the {conversation.dropped} oldest turn(s) no longer fit the model's context of "
                         f"{conversation.loaded.config.max_seq_len} tokens and were dropped)")


class PipeUI:
    """Plain text: one turn per input line; answers on stdout, everything else on stderr."""

    def __init__(self, stdin: TextIO, stdout: TextIO):
        self.stdin, self.stdout = stdin, stdout

    def welcome(self, session: Session) -> None:
        pass

    def read(self) -> str:
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line

    def stream(self, pieces: Iterator[str]) -> None:
        try:
            write_stream(self.stdout, pieces)
        finally:
            self.stdout.write("\n")
            self.stdout.flush()

    def note(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)

    def bye(self) -> None:
        pass


class TerminalUI:
    """rich on a terminal: styled prompt and notes, answers streamed as they are decoded."""

    def __init__(self):
        from rich.console import Console

        with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
            import readline  # noqa: F401
        self.console = Console(highlight=False)

    def welcome(self, session: Session) -> None:
        from rich.markup import escape

        loaded = session.conversation.loaded
        image = f", image {session.image_path}" if session.image_path else ""
        self.console.print(f"[bold]lav2 chat[/] with {escape(str(loaded.folder))}{escape(image)}. "
                           f"/help for commands, Ctrl-D to leave.")

    def read(self) -> str:
        return self.console.input("[bold green]you>[/] ")

    def stream(self, pieces: Iterator[str]) -> None:
        self.console.print("[bold blue]lav2>[/] ", end="")
        try:  # raw writes: the terminal wraps the growing line; rich would wrap each piece on its own
            write_stream(self.console.file, (CONTROL.sub("", piece) for piece in pieces))
        finally:
            self.console.print()

    def note(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False)

    def error(self, message: str) -> None:
        self.console.print(f"error: {message}", style="bold red", markup=False)

    def bye(self) -> None:
        self.console.print()
