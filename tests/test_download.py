"""`lav2 download` against tests/fakehub.py: registry fetches, checksums, resume, and one-line errors, offline.

Failure tests run the CLI (click's CliRunner) and check what a user sees: exit 1, one `error:` line on stderr, no
traceback, no model folder. Every hang is bounded: the `hub` fixture sets LAV2_HTTP_TIMEOUT to a few seconds.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from filelock import FileLock

from lav2 import download as dl
from lav2.cli import main
from lav2.errors import Lav2Error
from tests.fakehub import GARBAGE, FakeHub, git_blob_sha1

ROOT = Path(__file__).resolve().parents[1]

BIAS_7B_URL = ("https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/v.2.0.0/"
               "7fa55208379faf2dd862565284101b0e4a2a72114d6490a95e432cf9d9b6c813_BIAS-7B.pth")
V21_URL = ("https://github.com/OpenGVLab/LLaMA-Adapter/releases/download/v.2.1.0/"
           "d26d107eec32127ac86ef1997cf7169de1c56a59c539fc1258c6798b969e289c_LORA-BIAS-7B-v21.pth")
ADAPTER_BYTES = bytes(range(256)) * 40  # 10 kB stand-in for an official .pth
CLIP_FILES = {"open_clip_config.json": b'{"embed_dim": 8}', "open_clip_model.safetensors": b"\0" * 4096}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hugging Face LLaMA folder: config, safetensors weights and a SentencePiece tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    from lav2.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = [f"a llama number {i} reads the picture of a {w}" for i, w in enumerate(["cat", "dog", "tree"] * 40)]
    tokenizer = train_tokenizer(texts, folder / "tokenizer.model", vocab_size=300)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=172,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _release(name: str, data: bytes, *, sha256: str | None = None, size: int | None = None) -> dl.Release:
    return dl.Release(name, "v.2.0.0", sha256 or hashlib.sha256(data).hexdigest(), size or len(data))


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path):
    """A running fake hub with a tiny base, a CLIP repo and an adapter asset, and the registry name `tiny`."""
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("LAV2_RELEASE_URL", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("LAV2_HOME", str(tmp_path / "lav2"))
        monkeypatch.setenv("LAV2_HTTP_TIMEOUT", "5")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        base = hub.add_folder("test/tiny-llama", tiny_llama)
        base.files["pytorch_model.bin"] = b"pickles are not fetched when safetensors exist"
        hub.add_repo("test/tiny-clip", CLIP_FILES)
        release = _release("TINY-7B", ADAPTER_BYTES)
        hub.add_release(release.tag, release.filename, ADAPTER_BYTES)
        monkeypatch.setitem(dl.REGISTRY, "tiny", dl.Entry("tiny test model", "test/tiny-llama", 1, "test",
                                                          release, "test/tiny-clip"))
        monkeypatch.setitem(dl.REGISTRY, "tiny-base", dl.Entry("tiny base", "test/tiny-llama", 1, "test"))
        yield hub


def _one_line(error: pytest.ExceptionInfo[Lav2Error]) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["download", *args])


def _error_line(result: Result) -> str:
    """What a failed `lav2 download` printed: one `error:` line on stderr, exit 1, no traceback."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _blobs(tmp_path: Path, repo: str = "test/tiny-llama") -> Path:
    return tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "blobs"


def _served(data: bytes) -> bytes:
    """The bytes FakeHub.corrupt serves instead of `data`."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def _asset_requests(hub: FakeHub) -> list:
    return [r for r in hub.requests if r.path.startswith("/release-assets/")]


def _dead_url() -> str:
    with socket.socket() as s:  # bind then close: nothing listens on this port afterwards
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections (the kernel's backlog does) and never sends a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_registry_lists_every_name_with_size_and_licence():
    rows = dl.list_models()
    assert [r["name"] for r in rows] == ["7b", "7b-lora", "7b-caption", "7b-v21", "llama-7b"]
    assert all(r["what"] and r["size"] > 10**9 and "non-commercial" in r["licence"] for r in rows)
    assert dl.format_model_table().row_count == len(rows)


def test_registry_points_at_the_official_files():
    assert dl.REGISTRY["7b"].adapter.url("https://github.com") == BIAS_7B_URL
    assert dl.REGISTRY["7b-v21"].adapter.url("https://github.com/") == V21_URL
    assert {e.base for e in dl.REGISTRY.values()} == {"huggyllama/llama-7b"}
    assert dl.REGISTRY["7b-caption"].clip == "timm/vit_large_patch14_clip_224.openai"
    assert dl.REGISTRY["llama-7b"].adapter is None and dl.REGISTRY["llama-7b"].clip is None


def test_fetch_registry_name_gets_base_adapter_and_clip(hub: FakeHub, tmp_path: Path, tiny_llama: Path):
    files = dl.fetch("tiny")
    assert files.out == tmp_path / "lav2" / "tiny"
    assert sorted(p.name for p in files.base.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (files.base / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    assert str(files.base).startswith(str(tmp_path / "hf" / "hub"))
    assert files.adapter == tmp_path / "lav2" / "downloads" / dl.REGISTRY["tiny"].adapter.filename
    assert files.adapter.read_bytes() == ADAPTER_BYTES
    assert sorted(p.name for p in files.clip.iterdir()) == sorted(CLIP_FILES)

    before = len(hub.requests)
    assert dl.fetch("tiny") == files  # everything is cached: only the two listings go out again
    assert sorted(r.path.split("?")[0] for r in hub.requests[before:]) == ["/api/models/test/tiny-clip",
                                                                          "/api/models/test/tiny-llama"]


def test_hf_repo_id_is_a_base_and_out_overrides_home(hub: FakeHub, tmp_path: Path):
    files = dl.fetch("test/tiny-llama", out=tmp_path / "mine", home=tmp_path / "home")
    assert files.out == tmp_path / "mine" and files.adapter is None and files.clip is None
    assert dl.fetch("test/tiny-llama", home=tmp_path / "home").out == tmp_path / "home" / "tiny-llama"


def test_adapter_name_brings_the_clip_it_needs(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dl, "CLIP_L14", "test/tiny-clip")
    files = dl.fetch("test/tiny-llama", adapter="tiny")
    assert files.adapter.read_bytes() == ADAPTER_BYTES and (files.clip / "open_clip_model.safetensors").is_file()
    assert files.out.name == "tiny-llama-tiny-7b"


def test_hub_files_land_in_the_hub_cache_layout(hub: FakeHub, tmp_path: Path):
    files = dl.fetch("tiny-base")
    repo = hub.repos["test/tiny-llama"]
    folder = tmp_path / "hf" / "hub" / "models--test--tiny-llama"
    assert files.base == folder / "snapshots" / repo.sha and (folder / "refs" / "main").read_text() == repo.sha
    assert (files.base / "config.json").resolve() == folder / "blobs" / repo.sibling("config.json")["blobId"]
    sha256 = repo.sibling("model.safetensors")["lfs"]["sha256"]
    assert (files.base / "model.safetensors").resolve() == folder / "blobs" / sha256


@pytest.mark.parametrize("source", ["tiny", "tiny-base"])  # the release asset goes first in "tiny"
def test_dropped_connection_resumes_at_once_with_range(hub: FakeHub, tiny_llama: Path, source: str):
    hub.drop_next_transfer(after=3000)
    files = dl.fetch(source)
    first, second = [r for r in hub.requests if "/api/" not in r.path and r.status in (200, 206)][:2]
    assert "range" not in first.headers and first.sent == 3000
    assert second.path == first.path and second.headers["range"] == "bytes=3000-" and second.status == 206
    assert (files.base / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    if files.adapter:
        assert files.adapter.read_bytes() == ADAPTER_BYTES


def test_a_connection_that_keeps_dropping_gives_up_with_one_line(hub: FakeHub, tmp_path: Path):
    hub.drop_next_transfer(after=0, times=dl.RECONNECTS)
    result = _cli("tiny-base", "--out", str(tmp_path / "model"))
    line = _error_line(result)
    assert f"dropped {dl.RECONNECTS} times in a row" in line and "tokenizer.model" in line
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("path, kind", [("model.safetensors", "sha256"), ("config.json", "git-sha1")])
def test_corrupted_hub_file_is_refused_named_and_removed(hub: FakeHub, tmp_path: Path, path: str, kind: str):
    """An LFS file is checked against its sha256, a small git file against its git blob id."""
    repo = hub.repos["test/tiny-llama"]
    hub.corrupt("test/tiny-llama", path)
    sibling = repo.sibling(path)
    expected = sibling["lfs"]["sha256"] if kind == "sha256" else sibling["blobId"]
    served = _served(repo.files[path])
    actual = hashlib.sha256(served).hexdigest() if kind == "sha256" else git_blob_sha1(served)

    line = _error_line(_cli("test/tiny-llama", "--out", str(tmp_path / "model")))
    assert f"{path}: {kind} {actual} does not match the expected {expected}" in line and "removed" in line
    assert not any(p.name.startswith(expected) for p in _blobs(tmp_path).iterdir())  # no blob, no partial file
    assert not (tmp_path / "model").exists()

    repo.corrupt.clear()  # the hub serves the right bytes again: the rerun downloads and accepts them
    assert (dl.fetch("test/tiny-llama").base / path).read_bytes() == repo.files[path]


def test_wrong_sha256_is_refused_and_the_file_removed(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bad = _release("BAD-7B", ADAPTER_BYTES, sha256="0" * 64)
    hub.add_release(bad.tag, bad.filename, ADAPTER_BYTES)
    monkeypatch.setitem(dl.ADAPTERS, "BAD-7B", bad)
    with pytest.raises(Lav2Error) as error:
        dl.fetch("test/tiny-llama", adapter="BAD-7B", clip="test/tiny-clip")
    message = _one_line(error)
    assert f"sha256 {hashlib.sha256(ADAPTER_BYTES).hexdigest()} does not match the expected {'0' * 64}" in message
    assert "removed" in message
    assert not [p for p in (tmp_path / "lav2" / "downloads").iterdir() if p.is_file()]


@pytest.mark.parametrize("source", ["tiny", "tiny-base"])  # a release asset, a hub file
def test_stalled_server_ends_in_bounded_time_with_one_line(hub: FakeHub, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, source: str):
    monkeypatch.setenv("LAV2_HTTP_TIMEOUT", "0.5")
    hub.stall_next_transfer(after=3000)
    started = time.monotonic()
    result = _cli(source, "--out", str(tmp_path / "model"))
    assert time.monotonic() - started < 4
    line = _error_line(result)
    assert "stopped responding: no data for 0.5 s" in line and "3.0 kB kept in" in line and "rerun" in line
    assert "network access" not in line and "LAV2_HTTP_TIMEOUT" in line
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("variable", ["HF_ENDPOINT", "LAV2_RELEASE_URL"])
def test_server_that_never_answers_ends_in_bounded_time(hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                                        silent_url: str, variable: str):
    monkeypatch.setenv("LAV2_HTTP_TIMEOUT", "0.5")
    monkeypatch.setenv(variable, silent_url)
    started = time.monotonic()
    line = _error_line(_cli("tiny"))
    assert time.monotonic() - started < 4
    assert f"{silent_url.removeprefix('http://')} stopped responding" in line and "network access" not in line


@pytest.mark.parametrize("what", ["release", "hub"])
def test_stalled_download_resumes_with_range_at_the_next_run(hub: FakeHub, tmp_path: Path, tiny_llama: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, what: str):
    monkeypatch.setenv("LAV2_HTTP_TIMEOUT", "0.5")
    source, name, want = (("tiny", dl.REGISTRY["tiny"].adapter.filename, ADAPTER_BYTES) if what == "release" else
                          ("tiny-base", "model.safetensors", (tiny_llama / "model.safetensors").read_bytes()))
    after = 3000 if what == "release" else len(want) // 2
    if what == "hub":
        assert all(len(d) < after for n, d in hub.repos["test/tiny-llama"].files.items() if n != name)
    hub.stall_next_transfer(after=after)
    with pytest.raises(Lav2Error) as error:
        dl.fetch(source)
    assert "stopped responding" in _one_line(error)

    before = len(hub.requests)
    files = dl.fetch(source)
    got = files.adapter if what == "release" else files.base / name
    assert got.read_bytes() == want
    resumed = [r for r in hub.requests[before:] if name in r.path and r.status in (200, 206)]  # not its redirect
    assert len(resumed) == 1 and resumed[0].headers["range"] == f"bytes={after}-" and resumed[0].status == 206
    assert resumed[0].sent == len(want) - after  # bytes already on disk are not sent again
    assert f"resuming at {dl.decimal(after)}" in capsys.readouterr().err
    assert not list(got.resolve().parent.glob("*.incomplete")) and not list(got.parent.glob("*.part"))


def test_killed_hub_download_resumes_at_the_next_run(hub: FakeHub, tmp_path: Path, tiny_llama: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    """A download killed mid-file (SIGKILL: no cleanup runs) leaves a partial file that the next run resumes."""
    want = (tiny_llama / "model.safetensors").read_bytes()
    sha256 = hashlib.sha256(want).hexdigest()
    part = _blobs(tmp_path) / f"{sha256}.incomplete"
    hub.stall_next_transfer(after=len(want) // 2)
    monkeypatch.setenv("LAV2_HTTP_TIMEOUT", "60")  # the child waits on the stalled transfer until it is killed
    child = subprocess.Popen([sys.executable, "-c", "from lav2.download import fetch; fetch('test/tiny-llama')"],
                             cwd=ROOT, env=os.environ.copy(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while dl._size(part) < len(want) // 2 and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dl._size(part) == len(want) // 2 and child.poll() is None
    finally:
        child.kill()
        child.wait(timeout=10)

    monkeypatch.setenv("LAV2_HTTP_TIMEOUT", "5")
    files = dl.fetch("test/tiny-llama")
    assert (files.base / "model.safetensors").read_bytes() == want and not part.exists()
    assert hub.requests[-1].headers["range"] == f"bytes={len(want) // 2}-"


def test_partial_files_that_huggingface_hub_left_are_removed_with_one_line(hub: FakeHub, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture):
    sha256 = hub.repos["test/tiny-llama"].sibling("model.safetensors")["lfs"]["sha256"]
    _blobs(tmp_path).mkdir(parents=True)
    leftovers = [_blobs(tmp_path) / f"{sha256}.{tag}.incomplete" for tag in ("1a2b3c4d", "5e6f7a8b")]
    for leftover in leftovers:
        leftover.write_bytes(b"\0" * 1000)
    dl.fetch("tiny-base")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors: removed 2 partial file(s) (2.0 kB)" in lines[0]
    assert not any(leftover.exists() for leftover in leftovers)


def test_a_file_another_process_is_downloading_is_refused(hub: FakeHub, tmp_path: Path):
    sha256 = hub.repos["test/tiny-llama"].sibling("tokenizer.model")["lfs"]["sha256"]
    lock = tmp_path / "hf" / "hub" / ".locks" / "models--test--tiny-llama" / f"{sha256}.lock"
    lock.parent.mkdir(parents=True)
    with FileLock(lock):
        line = _error_line(_cli("tiny-base", "--out", str(tmp_path / "model")))
    assert "tokenizer.model is being downloaded by another process" in line
    assert dl.fetch("tiny-base").base.is_dir()  # once the other process is done, a rerun proceeds


@pytest.mark.parametrize("garbage", [GARBAGE, b"[1, 2, 3]"])
def test_hub_answering_garbage_instead_of_json_gets_one_line(hub: FakeHub, tmp_path: Path, garbage: bytes):
    hub.garbage_api = garbage
    line = _error_line(_cli("tiny-base", "--out", str(tmp_path / "model")))
    assert "did not answer with a model listing for test/tiny-llama" in line and "HF_ENDPOINT" in line


@pytest.mark.parametrize("how", ["env", "option"])
def test_wrong_token_is_reported_as_a_bad_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                how: str):
    args = ["--token", "hf_wrong"] if how == "option" else []
    if how == "env":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    line = _error_line(_cli("tiny-base", "--out", str(tmp_path / "model"), *args))
    assert "rejected the Hugging Face token (401 invalid credentials)" in line
    assert "HF_TOKEN" in line and "--token" in line and "licence" not in line


def test_gated_repo_with_a_token_that_did_not_accept_the_licence(hub: FakeHub, tiny_llama: Path, tmp_path: Path):
    hub.add_folder("meta/gated-llama", tiny_llama, gated=True)
    hub.tokens.add("hf_other_account")
    line = _error_line(_cli("meta/gated-llama", "--out", str(tmp_path / "model"), "--token", "hf_other_account"))
    assert "meta/gated-llama is gated: accept its licence at https://huggingface.co/meta/gated-llama" in line
    assert "rejected" not in line
    assert any(r.status == 403 for r in hub.requests)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf"])
def test_bad_http_timeout_gets_one_line(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("LAV2_HTTP_TIMEOUT", value)
    assert f"LAV2_HTTP_TIMEOUT={value!r}" in _error_line(_cli("tiny-base"))


def test_local_adapter_with_wrong_sha256_prefix_is_refused(hub: FakeHub, tmp_path: Path, tiny_llama: Path):
    fake = tmp_path / (("1" * 64) + "_BIAS-7B.pth")
    fake.write_bytes(ADAPTER_BYTES)
    with pytest.raises(Lav2Error) as error:
        dl.fetch(str(tiny_llama), adapter=fake, clip="test/tiny-clip")
    assert "sha256" in _one_line(error) and fake.exists()  # the user's own file is never deleted


def test_gated_repo_without_token_says_where_to_accept_the_licence(hub: FakeHub, tiny_llama: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    hub.add_folder("meta/gated-llama", tiny_llama, gated=True)
    with pytest.raises(Lav2Error) as error:
        dl.fetch("meta/gated-llama")
    message = _one_line(error)
    assert "https://huggingface.co/meta/gated-llama" in message and "HF_TOKEN" in message and "--token" in message
    assert any(r.status == 401 for r in hub.requests)

    assert (dl.fetch("meta/gated-llama", token="hf_good_token").base / "model.safetensors").is_file()
    monkeypatch.setenv("HF_TOKEN", "hf_good_token")
    assert dl.fetch("meta/gated-llama").base.is_dir()


def test_unknown_repo_is_not_found_and_lists_registry_names(hub: FakeHub):
    with pytest.raises(Lav2Error) as error:
        dl.fetch("nobody/nothing")
    message = _one_line(error)
    assert "nobody/nothing not found" in message and "7b-lora" in message


def test_unknown_name_or_missing_folder_is_refused(hub: FakeHub):
    with pytest.raises(Lav2Error) as error:
        dl.fetch("not-a-model")
    assert "llama-7b" in _one_line(error)
    with pytest.raises(Lav2Error) as error:
        dl.fetch("test/tiny-llama", clip="/no/such/clip/folder")
    assert "CLIP" in _one_line(error)


def test_missing_release_asset_is_not_found(hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(dl.ADAPTERS, "GONE-7B", _release("GONE-7B", b"never served"))
    with pytest.raises(Lav2Error) as error:
        dl.fetch("test/tiny-llama", adapter="GONE-7B", clip="test/tiny-clip")
    assert "GONE-7B not found" in _one_line(error)


def test_repo_without_tokenizer_model_is_refused(hub: FakeHub, tiny_llama: Path):
    repo = hub.add_folder("test/no-tokenizer", tiny_llama)
    del repo.files["tokenizer.model"]
    with pytest.raises(Lav2Error) as error:
        dl.fetch("test/no-tokenizer")
    assert "tokenizer.model" in _one_line(error)


@pytest.mark.parametrize("variable", ["HF_ENDPOINT", "LAV2_RELEASE_URL"])
def test_connection_refused_names_the_host(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, variable: str):
    dead = _dead_url()
    monkeypatch.setenv(variable, dead)
    with pytest.raises(Lav2Error) as error:
        dl.fetch("tiny")
    message = _one_line(error)
    assert dead.removeprefix("http://") in message and "network" in message


def test_disk_space_is_checked_before_downloading(hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    huge = _release("HUGE-7B", ADAPTER_BYTES, size=10**18)
    monkeypatch.setitem(dl.REGISTRY, "huge", dl.Entry("huge", "test/tiny-llama", 10**18, "test", huge,
                                                      "test/tiny-clip"))
    with pytest.raises(Lav2Error) as error:
        dl.fetch("huge")
    assert "disk space" in _one_line(error) and "needed" in str(error.value)
    assert not _asset_requests(hub) and not any("/resolve/" in r.path for r in hub.requests)


def test_local_folder_is_used_in_place_without_network(hub: FakeHub, tiny_llama: Path, tmp_path: Path):
    files = dl.fetch(str(tiny_llama))
    assert files.base == tiny_llama and files.out == tmp_path / "lav2" / tiny_llama.name
    assert hub.requests == []


def test_download_registry_name_imports_a_model_folder(hub: FakeHub, tmp_path: Path, tiny_base, tiny_official,
                                                       clip_folder: Path, monkeypatch: pytest.MonkeyPatch):
    meta, _, _ = tiny_base
    pth, _ = tiny_official
    hub.add_folder("test/tiny-meta", meta)  # Meta's layout on the hub: params.json + consolidated.00.pth
    hub.add_repo("test/tiny-clip", {p.name: p.read_bytes() for p in clip_folder.iterdir()})
    release = _release("BIAS-7B", pth.read_bytes())
    hub.add_release(release.tag, release.filename, pth.read_bytes())
    monkeypatch.setitem(dl.REGISTRY, "tiny-official", dl.Entry("tiny official", "test/tiny-meta", 1, "test",
                                                               release, "test/tiny-clip"))
    out = dl.download("tiny-official")
    assert out == tmp_path / "lav2" / "tiny-official"
    assert (out / "lav2.json").is_file() and (out / "tokenizer.model").is_file()


def test_download_hf_repo_imports_a_base_model_folder(hub: FakeHub, tmp_path: Path):
    out = dl.download("test/tiny-llama", out=tmp_path / "model")
    assert out == tmp_path / "model" and (out / "lav2.json").is_file() and (out / "tokenizer.model").is_file()
