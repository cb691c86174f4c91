"""Model registry and fetching: `lav2 download 7b` fetches the LLaMA base, the official adapter and CLIP, then imports.

Three kinds of source files:

- Hugging Face repos (the LLaMA base, the open_clip CLIP). huggingface_hub lists the repo, with each file's size
  and checksum (an LFS file's sha256, a small file's git blob id), and builds the URLs, auth headers and errors;
  lav2 moves the bytes itself, because huggingface_hub neither checks what it downloads against those checksums
  nor resumes a partial file across runs. Files land in the hub cache's own layout (blobs/<checksum>,
  snapshots/<commit>/<path>, refs/main), so other tools share them. HF_ENDPOINT, HF_TOKEN and HF_HUB_CACHE are
  read per call.
- The official LLaMA-Adapter V2 files, GitHub release assets named `<sha256>_<NAME>.pth`, fetched into
  `$LAV2_HOME/downloads/` and checked against the sha256 in their name. `LAV2_RELEASE_URL` (default
  https://github.com) replaces the host, for mirrors and tests.
- Local folders and files, used as they are.

Every remote file is streamed into a partial file beside its destination, resumed with an HTTP Range request (at
once when a connection drops, at the next run after a stall, an error or a kill), checked against its checksum
(a mismatch removes it) and only then given its final name. A server silent for `LAV2_HTTP_TIMEOUT` seconds
(default 60), while connecting or mid-file, ends the run with one line.

`fetch` gets the files; `download` fetches and hands them to `lav2.checkpoint.import_model`, which writes the model
folder. Every failure a user can fix is a one-line `Lav2Error`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import filelock
import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status
from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from lav2.errors import Lav2Error

GB = 1_000_000_000
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
RELEASE_REPO = "OpenGVLab/LLaMA-Adapter"
CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SHA256_PREFIX = re.compile(r"^([0-9a-f]{64})_(.+)$")
CHUNK = 1 << 20
HTTP_TIMEOUT = 60.0  # seconds a server may stay silent; LAV2_HTTP_TIMEOUT overrides
RECONNECTS = 3  # dropped connections in a row, with no new bytes between them, before a transfer gives up

# The official repo is GPL-3.0; its MODEL_CARD.md puts the weights under LLaMA's non-commercial terms.
LLAMA1_LICENCE = "LLaMA-1 non-commercial research"
ADAPTER_LICENCE = "adapter GPL-3.0 code, non-commercial weights"
CLIP_LICENCE = "CLIP MIT"


@dataclass(frozen=True)
class Release:
    """An official LLaMA-Adapter V2 checkpoint, a GitHub release asset of OpenGVLab/LLaMA-Adapter."""

    name: str
    tag: str
    sha256: str
    size: int  # approximate bytes, for the disk-space check before the real length is known

    @property
    def filename(self) -> str:
        return f"{self.sha256}_{self.name}.pth"

    def url(self, base: str) -> str:
        return f"{base.rstrip('/')}/{RELEASE_REPO}/releases/download/{self.tag}/{self.filename}"


@dataclass(frozen=True)
class Entry:
    """A registry name: a LLaMA base repo, optionally with an official adapter and the CLIP it was trained with."""

    what: str
    base: str  # Hugging Face repo id of the LLaMA base
    size: int  # approximate total download in bytes, for `--list`
    licence: str
    adapter: Release | None = None
    clip: str | None = None  # Hugging Face repo id holding CLIP_FILES


@dataclass(frozen=True)
class Fetched:
    """Local paths of everything one `download` imports."""

    base: Path
    out: Path
    adapter: Path | None = None
    clip: Path | None = None


ADAPTERS = {
    r.name: r
    for r in (
        Release("BIAS-7B", "v.2.0.0", "7fa55208379faf2dd862565284101b0e4a2a72114d6490a95e432cf9d9b6c813", GB // 4),
        Release("LORA-BIAS-7B", "v.2.0.0", "1bcbffc43484332672092e0024a8699a6eb5f558161aebf98a7c6b1db67224d1",
                GB * 2 // 5),
        Release("CAPTION-7B", "v.2.0.0", "5088aeb63a89746b90bcfd5cb819e1c7411b2771b267c6d131ce73e250a8abf0", GB // 4),
        # v2.1 is a later release tag, as in the official llama_adapter.py since commit a50befe.
        Release("LORA-BIAS-7B-v21", "v.2.1.0", "d26d107eec32127ac86ef1997cf7169de1c56a59c539fc1258c6798b969e289c",
                GB * 2 // 5),
    )
}
LLAMA_7B = "huggyllama/llama-7b"  # public mirror of Meta's LLaMA-1 7B, fp16 safetensors (13.5 GB)
LLAMA_7B_SIZE = 13_480_000_000
CLIP_L14 = "timm/vit_large_patch14_clip_224.openai"  # open_clip's own hub source for ViT-L-14 "openai"
CLIP_L14_SIZE = 1_710_000_000


def _multimodal(what: str, adapter: str) -> Entry:
    release = ADAPTERS[adapter]
    return Entry(what, LLAMA_7B, LLAMA_7B_SIZE + release.size + CLIP_L14_SIZE,
                 f"{LLAMA1_LICENCE}; {ADAPTER_LICENCE}; {CLIP_LICENCE}", release, CLIP_L14)


REGISTRY: dict[str, Entry] = {
    "7b": _multimodal("LLaMA-Adapter V2 multimodal, bias tuning (BIAS-7B) + LLaMA-1 7B + CLIP ViT-L/14", "BIAS-7B"),
    "7b-lora": _multimodal("LLaMA-Adapter V2 multimodal, bias + LoRA (LORA-BIAS-7B)", "LORA-BIAS-7B"),
    "7b-caption": _multimodal("LLaMA-Adapter V2 image captioning (CAPTION-7B)", "CAPTION-7B"),
    "7b-v21": _multimodal("LLaMA-Adapter V2.1 multimodal, bias + LoRA (LORA-BIAS-7B-v21)", "LORA-BIAS-7B-v21"),
    "llama-7b": Entry("LLaMA-1 7B base model alone", LLAMA_7B, LLAMA_7B_SIZE, LLAMA1_LICENCE),
}


def list_models() -> list[dict]:
    """The registry as rows of name, what, size (approximate bytes) and licence, for `lav2 download --list`."""
    return [{"name": n, "what": e.what, "size": e.size, "licence": e.licence} for n, e in REGISTRY.items()]


def format_model_table() -> Table:
    table = Table(title="lav2 download NAME  (or a Hugging Face LLaMA repo id, or a local folder)")
    for column in ("name", "what", "size", "licence"):
        table.add_column(column, overflow="fold")
    for row in list_models():
        table.add_row(row["name"], row["what"], f"~{decimal(row['size'])}", row["licence"])
    return table


def lav2_home(home: Path | None = None) -> Path:
    """Where model folders live by default: `home` if given, else $LAV2_HOME, else ~/.cache/lav2."""
    return Path(home or os.environ.get("LAV2_HOME") or Path.home() / ".cache" / "lav2").expanduser()


def download(
    source: str,
    *,
    out: Path | None = None,
    adapter: str | Path | None = None,
    clip: str | Path | None = None,
    token: str | None = None,
    home: Path | None = None,
) -> Path:
    """Fetch a model and import it as a lav2 model folder; returns the folder.

    SOURCE is a registry name (`lav2 download --list`), a Hugging Face LLaMA repo id (owner/name; gated repos need
    HF_TOKEN or --token) or a local Meta or Hugging Face LLaMA folder. --adapter takes an official .pth file or
    name (BIAS-7B, LORA-BIAS-7B, CAPTION-7B, LORA-BIAS-7B-v21); --clip a folder with open_clip_config.json and
    open_clip_model.safetensors. The folder goes to --out, else $LAV2_HOME/NAME, else ~/.cache/lav2/NAME.
    Every downloaded file is checked against the checksum its host announces; an interrupted download resumes
    where it stopped when the same command runs again. A server silent for $LAV2_HTTP_TIMEOUT seconds (default
    60) ends the download.
    """
    from lav2.checkpoint import import_model  # checkpoint imports torch; keep `--list` and --help light

    files = fetch(source, out=out, adapter=adapter, clip=clip, token=token, home=home)
    return import_model(files.base, files.out, adapter=files.adapter, clip=files.clip)


def fetch(
    source: str,
    *,
    out: Path | None = None,
    adapter: str | Path | None = None,
    clip: str | Path | None = None,
    token: str | None = None,
    home: Path | None = None,
) -> Fetched:
    """Fetch what `download` imports, without importing; same arguments as `download`."""
    home = lav2_home(home)
    hub = _Hub(token or None)
    entry = REGISTRY.get(source)
    base: str | Path = entry.base if entry else _base_source(source)
    name = source if entry else (base.name if isinstance(base, Path) else source.split("/")[1])

    release: Release | None = entry.adapter if entry else None
    adapter_path: Path | None = None
    if adapter is not None:
        release, adapter_path = _adapter_source(adapter)
        name += "-" + (release.name if release else _adapter_label(Path(adapter))).lower()

    clip_source: str | Path | None = entry.clip if entry else None
    if clip is not None:
        clip_source = _clip_source(clip)
    elif clip_source is None and (release or adapter_path):
        clip_source = CLIP_L14  # the official adapters were trained on this CLIP and are useless without it

    out = Path(out).expanduser() if out else home / name
    downloads = home / "downloads"
    base_files = hub.plan(base, _base_files) if isinstance(base, str) else None
    clip_files = hub.plan(clip_source, _clip_files) if isinstance(clip_source, str) else None

    # Bytes still to fetch per staging folder, and the imported folder, about as large as what it is made from.
    needs: dict[Path, int] = {out.parent: 0}
    for plan in (base_files, clip_files):
        if plan:
            needs[hub.cache] = needs.get(hub.cache, 0) + hub.missing_bytes(plan)
            needs[out.parent] += sum(c.size or 0 for c in plan.files.values())
    if release:
        needs[downloads] = _release_missing_bytes(release, downloads)
        needs[out.parent] += release.size
    for local in (base, adapter_path, clip_source):
        if isinstance(local, Path):
            needs[out.parent] += sum(p.stat().st_size for p in (local.rglob("*") if local.is_dir() else [local]))
    _check_disk(needs)

    with _http_client() as client:
        if release:
            adapter_path = _fetch_release(client, release, downloads)
        clip_path = hub.get(client, clip_files) if clip_files else (Path(clip_source) if clip_source else None)
        base_path = hub.get(client, base_files) if base_files else Path(base)
    return Fetched(base=base_path, out=out, adapter=adapter_path, clip=clip_path)


# --- sources -------------------------------------------------------------------------------------------------------


def _base_source(source: str) -> str | Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Lav2Error(f"{source} is a file; give a LLaMA folder (Meta: params.json + consolidated.*.pth, "
                        "Hugging Face: config.json + weights), a repo id or a registry name")
    if REPO_ID.match(source):
        return source
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise Lav2Error(f"{source}: no such folder; give a Meta or Hugging Face LLaMA folder, a repo id or a "
                        f"registry name ({', '.join(REGISTRY)})")
    raise Lav2Error(f"unknown model {source!r}: not a folder, a Hugging Face repo id (owner/name) or a registry "
                    f"name ({', '.join(REGISTRY)})")


def _adapter_source(adapter: str | Path) -> tuple[Release | None, Path | None]:
    text = str(adapter)
    if text in ADAPTERS:
        return ADAPTERS[text], None
    if text in REGISTRY and REGISTRY[text].adapter:
        return REGISTRY[text].adapter, None
    path = Path(adapter).expanduser()
    if not path.is_file():
        raise Lav2Error(f"adapter {text!r} not found: give an official .pth file or one of {', '.join(ADAPTERS)}")
    if m := SHA256_PREFIX.match(path.name):
        _verify_sha256(path, m[1], remove=False)
    return None, path


def _adapter_label(path: Path) -> str:
    m = SHA256_PREFIX.match(path.stem)
    return m[2] if m else path.stem


def _clip_source(clip: str | Path) -> str | Path:
    path = Path(clip).expanduser()
    if path.is_dir():
        missing = [f for f in CLIP_FILES if not (path / f).is_file()]
        if missing:
            raise Lav2Error(f"CLIP folder {path} lacks {', '.join(missing)} (open_clip's config and safetensors)")
        return path
    if REPO_ID.match(str(clip)):
        return str(clip)
    raise Lav2Error(f"CLIP folder {clip} not found: give a folder with {' and '.join(CLIP_FILES)}")


def _base_files(repo: str, listing: list[str]) -> list[str]:
    """What the importer needs from a LLaMA repo, preferring safetensors over pickled .bin and Meta .pth shards."""
    for patterns in (("model*.safetensors", "model.safetensors.index.json"),
                     ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
                     ("consolidated.*.pth", "params.json")):
        weights = [f for f in listing if any(fnmatch(f, p) for p in patterns)]
        if any(not f.endswith(".json") for f in weights):
            break
    else:
        raise Lav2Error(f"{repo} holds no LLaMA weights (model*.safetensors, pytorch_model*.bin or consolidated.*.pth)")
    needed = ["tokenizer.model"] + ([] if "params.json" in weights else ["config.json"])
    missing = [f for f in needed if f not in listing]
    if missing:
        raise Lav2Error(f"{repo} lacks {', '.join(missing)}: lav2 needs a LLaMA-1/2 repo with a SentencePiece "
                        "tokenizer.model")
    return needed + weights


def _clip_files(repo: str, listing: list[str]) -> list[str]:
    missing = [f for f in CLIP_FILES if f not in listing]
    if missing:
        raise Lav2Error(f"{repo} lacks {', '.join(missing)}: it is not an open_clip model repo")
    return list(CLIP_FILES)


# --- Hugging Face hub ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checksum:
    """What a file's bytes must hash to: "sha256", or "git-sha1" (git's blob id, the sha1 of a header and the
    bytes, which is all the hub announces for a small non-LFS file)."""

    kind: str
    hex: str
    size: int | None = None  # git-sha1 hashes the size first, so it needs it

    def new(self) -> hashlib._Hash:
        if self.kind == "sha256":
            return hashlib.sha256()
        return hashlib.sha1(b"blob %d\0" % (self.size or 0))


@dataclass(frozen=True)
class _HubPlan:
    repo: str
    sha: str
    files: dict[str, Checksum]  # repo path -> its checksum, whose size is the file's


class _Hub:
    """The hub's listing and files, with the endpoint, token and cache read now, not when huggingface_hub was
    imported."""

    def __init__(self, token: str | None) -> None:
        self.token = token  # None: huggingface_hub uses HF_TOKEN or the stored login
        self.endpoint = os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT).rstrip("/")
        hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
        self.cache = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub").expanduser()

    def plan(self, repo: str, choose: Callable[[str, list[str]], list[str]]) -> _HubPlan:
        """List the repo once, so the files, their sizes and checksums are known before anything is downloaded."""
        with self._errors(repo):
            try:
                info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                    repo, files_metadata=True, timeout=http_timeout())
            except (KeyError, TypeError) as e:  # JSON, but not the shape of a model listing
                raise Lav2Error(_not_a_listing(repo, self.endpoint, f"{type(e).__name__}: {e}")) from None
        if not isinstance(info.sha, str):
            raise Lav2Error(_not_a_listing(repo, self.endpoint, "no commit sha"))
        listed = {s.rfilename: s for s in info.siblings or []}
        files = {}
        for name in choose(repo, list(listed)):
            sibling = listed[name]
            if sibling.lfs is not None:
                files[name] = Checksum("sha256", sibling.lfs.sha256, sibling.lfs.size)
            elif sibling.blob_id and sibling.size is not None:
                files[name] = Checksum("git-sha1", sibling.blob_id, sibling.size)
            else:
                raise Lav2Error(f"{urlsplit(self.endpoint).netloc} lists no checksum for {repo}/{name}, so lav2 "
                                f"cannot check the download; point HF_ENDPOINT at a Hugging Face hub")
        return _HubPlan(repo, info.sha, files)

    def missing_bytes(self, plan: _HubPlan) -> int:
        """Bytes still to download: files neither in the snapshot nor among the blobs, less their partial files."""
        folder = self._folder(plan.repo)
        missing = 0
        for name, checksum in plan.files.items():
            blob = folder / "blobs" / checksum.hex
            if not (folder / "snapshots" / plan.sha / name).is_file() and not blob.is_file():
                missing += max((checksum.size or 0) - _size(_partial(blob, ".incomplete")), 0)
        return missing

    def get(self, client: httpx2.Client, plan: _HubPlan) -> Path:
        """Download what the snapshot lacks into the cache; returns the snapshot folder."""
        folder = self._folder(plan.repo)
        snapshot = folder / "snapshots" / plan.sha
        headers = build_hf_headers(token=self.token)
        with self._errors(plan.repo):
            for name, checksum in plan.files.items():
                pointer = snapshot / name
                if pointer.is_file():
                    continue
                blob = folder / "blobs" / checksum.hex
                if not blob.is_file():
                    url = hf_hub_url(plan.repo, name, revision=plan.sha, endpoint=self.endpoint)
                    _fetch_file(client, url, blob, checksum, name=name, headers=headers, refuse=hf_raise_for_status,
                                lock=self.cache / ".locks" / folder.name / f"{checksum.hex}.lock")
                _link(blob, pointer)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(plan.sha)  # the listing was of the default branch
        return snapshot

    def _folder(self, repo: str) -> Path:
        return self.cache / ("models--" + repo.replace("/", "--"))

    @contextmanager
    def _errors(self, repo: str) -> Iterator[None]:
        """Turn huggingface_hub's exceptions into one line that says what to do."""
        host = urlsplit(self.endpoint).netloc
        try:
            yield
        except GatedRepoError:
            raise Lav2Error(_gated(repo)) from None
        except HFValidationError as e:
            raise Lav2Error(f"{repo!r} is not a valid Hugging Face repo id: {_first_line(e)}") from None
        except RepositoryNotFoundError:
            raise Lav2Error(f"{repo} not found on {host} (a private repo needs HF_TOKEN or --token); "
                            f"registry names: {', '.join(REGISTRY)}") from None
        except RemoteEntryNotFoundError as e:
            raise Lav2Error(f"file not found in {repo} on {host}: {urlsplit(str(e.response.url)).path}") from None
        except HfHubHTTPError as e:
            status = e.response.status_code
            sent_token = "authorization" in {k.lower() for k in build_hf_headers(token=self.token)}
            if status == 401 and sent_token:
                raise Lav2Error(f"{host} rejected the Hugging Face token (401 invalid credentials) for {repo}: check "
                                "HF_TOKEN or --token (tokens are at https://huggingface.co/settings/tokens), or "
                                "unset it for a public repo") from None
            if status == 403:  # a fine-grained token without read access to this repo

                raise Lav2Error(f"{host} refused {repo} to this token (403 {_first_line(e)}): give a token with "
                                "read access in HF_TOKEN or --token") from None
            if status == 404:
                raise Lav2Error(f"{repo} not found on {host}; registry names: {', '.join(REGISTRY)}") from None
            raise Lav2Error(f"{host} answered {status} for {repo}: {_first_line(e)}") from None
        except json.JSONDecodeError:
            raise Lav2Error(_not_a_listing(repo, self.endpoint, "not JSON: an HTML page from a proxy or a "
                                                                "login portal?")) from None
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
            raise Lav2Error(_offline(host, e)) from None
        except httpx2.TimeoutException:
            raise Lav2Error(f"{host} stopped responding: no answer to the listing of {repo} for "
                            f"{http_timeout():g} s; try again later, or raise LAV2_HTTP_TIMEOUT on a slow "
                            "link") from None
        except OfflineModeIsEnabled:
            raise Lav2Error(f"HF_HUB_OFFLINE is set, so {repo} cannot be fetched: unset it, or give a local model "
                            "folder instead") from None
        except httpx2.TransportError as e:
            raise Lav2Error(f"the connection to {host} failed while listing {repo} ({_first_line(e)}); rerun the "
                            "same command") from None


def _gated(repo: str) -> str:
    return (f"{repo} is gated: accept its licence at https://huggingface.co/{repo} with your account, then set "
            "HF_TOKEN or pass --token with that account's token")


def _not_a_listing(repo: str, endpoint: str, what: str) -> str:
    return (f"{urlsplit(endpoint).netloc} did not answer with a model listing for {repo} ({what}); check "
            f"HF_ENDPOINT ({endpoint}) and any proxy in between")


def _offline(host: str, error: BaseException) -> str:
    return (f"cannot reach {host} ({_first_line(error) or type(error).__name__}): lav2 download needs network "
            "access, or give a local model folder instead")


def _link(blob: Path, pointer: Path) -> None:
    """Point the snapshot's file at its blob, as the hub cache does; a copy where symlinks are not allowed."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)  # a dangling link of an earlier, removed blob
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        shutil.copyfile(blob, pointer)


# --- official release files ------------------------------------------------------------------------------------------


def _release_missing_bytes(release: Release, folder: Path) -> int:
    if (folder / release.filename).is_file():
        return 0
    return max(release.size - _size(_partial(folder / release.filename, ".part")), 0)


def _fetch_release(client: httpx2.Client, release: Release, folder: Path) -> Path:
    final = folder / release.filename
    if final.is_file():
        return final  # only verified files get their final name
    url = release.url(os.environ.get("LAV2_RELEASE_URL", "https://github.com"))

    def refuse(response: httpx2.Response) -> None:
        if response.status_code == 404:
            raise Lav2Error(f"{release.name} not found at {url}; check LAV2_RELEASE_URL")
        raise Lav2Error(f"{urlsplit(url).netloc} answered {response.status_code} for {url}")

    _fetch_file(client, url, final, Checksum("sha256", release.sha256), name=release.name,
                headers={"User-Agent": "lav2"}, refuse=refuse, lock=folder / ".locks" / f"{release.filename}.lock",
                part_suffix=".part")
    return final


def _verify_sha256(path: Path, expected: str, *, remove: bool) -> None:
    """Check a local file against the sha256 in its name; the user's own file is never removed."""
    _check(path, _digest(path, Checksum("sha256", expected)), Checksum("sha256", expected), name=path.name,
           remove=remove)


# --- transfers -------------------------------------------------------------------------------------------------------


def http_timeout() -> float:
    """Seconds a server may stay silent, connecting or mid-file, before lav2 gives up: $LAV2_HTTP_TIMEOUT, else 60."""
    text = os.environ.get("LAV2_HTTP_TIMEOUT", "").strip()
    if not text:
        return HTTP_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise Lav2Error(f"LAV2_HTTP_TIMEOUT={text!r}: give the seconds to wait for a silent server, a positive "
                        f"number such as {HTTP_TIMEOUT:g}")
    return seconds


def _http_client() -> httpx2.Client:
    # httpx drops the Authorization header when a redirect leaves the host (the hub sends LFS files to a CDN).
    return httpx2.Client(timeout=httpx2.Timeout(http_timeout()), follow_redirects=True)


def _fetch_file(client: httpx2.Client, url: str, final: Path, checksum: Checksum, *, name: str,
                headers: dict[str, str], refuse: Callable[[httpx2.Response], None], lock: Path,
                part_suffix: str = ".incomplete") -> None:
    """Download `url` to `final` through a partial file that a later run resumes; one process per file at a time.

    Partial files of huggingface_hub's own (`final.<id>.incomplete`, left by a killed run) are removed: they may
    have been written out of order, so they are no base to resume from.
    """
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Lav2Error(f"cannot create {e.filename} ({e.strerror}): choose another --home / HF_HOME") from None
    try:
        with filelock.FileLock(lock, timeout=0):
            if final.is_file():
                return  # another process finished it
            part = _partial(final, part_suffix)
            stale = [p for p in final.parent.glob(f"{final.name}.*.incomplete") if p != part]
            if stale:
                freed = sum(_size(p) for p in stale)
                for p in stale:
                    p.unlink()
                _say(f"{name}: removed {len(stale)} partial file(s) ({decimal(freed)}) that an interrupted "
                     f"earlier download left in {final.parent}")
            if _size(part):
                total = f" of {decimal(checksum.size)}" if checksum.size else ""
                _say(f"{name}: resuming at {decimal(_size(part))}{total} that an earlier run downloaded")
            digest = _transfer(client, url, part, checksum, name=name, headers=headers, refuse=refuse)
            _check(part, digest, checksum, name=name, remove=True)
            part.replace(final)
    except filelock.Timeout:
        raise Lav2Error(f"{name} is being downloaded by another process (lock {lock}); wait for it to finish, or "
                        "stop it, then rerun") from None


def _transfer(client: httpx2.Client, url: str, part: Path, checksum: Checksum, *, name: str,
              headers: dict[str, str], refuse: Callable[[httpx2.Response], None]) -> hashlib._Hash:
    """Append the rest of `url` to `part`, from its size on with a Range request; returns the digest of the whole.

    `refuse` raises for an error status. A dropped connection is resumed at once, up to RECONNECTS times in a row
    without new bytes; a silent server raises a one-line Lav2Error and `part` is kept for the next run.
    """
    host = urlsplit(url).netloc
    digest = checksum.new()
    have = _hash_into(digest, part)
    failures = 0
    with _progress() as progress:
        task = progress.add_task(name, total=checksum.size, completed=have)
        while True:
            before = have
            try:
                # identity: the bytes on the wire are the file's, so a Range counts in them and chunks arrive as sent
                ask = {**headers, "Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
                with client.stream("GET", url, headers=ask) as response:
                    if response.status_code == 416 and have:
                        return digest  # nothing past what we have: the checksum says whether it is right
                    if response.status_code >= 400:
                        response.read()
                        refuse(response)
                    if have and response.status_code != 206:
                        digest, have = checksum.new(), 0  # the server ignored the Range: start over
                        progress.update(task, completed=0)
                    if response.headers.get("Content-Length") is not None:
                        progress.update(task, total=have + int(response.headers["Content-Length"]))
                    try:
                        with part.open("ab" if have else "wb") as f:
                            for chunk in response.iter_bytes():  # raises httpx2 errors, which are no OSError
                                f.write(chunk)
                                digest.update(chunk)
                                have += len(chunk)
                                progress.update(task, completed=have)
                    except OSError as e:
                        raise Lav2Error(f"cannot write {part} ({e.strerror or e}): free some space or choose "
                                        "another --home / HF_HOME; rerun the same command to resume") from None
                return digest
            except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
                raise Lav2Error(_offline(host, e) + _kept(part)) from None
            except httpx2.TimeoutException:
                raise Lav2Error(f"{host} stopped responding: no data for {http_timeout():g} s while sending {name}"
                                f"{_kept(part) or '; rerun the same command later'} (or raise LAV2_HTTP_TIMEOUT "
                                "on a slow link)") from None
            except (httpx2.RemoteProtocolError, httpx2.ReadError) as e:
                failures = 0 if have > before else failures + 1
                if failures >= RECONNECTS:
                    raise Lav2Error(f"the connection to {host} dropped {RECONNECTS} times in a row while sending "
                                    f"{name} ({_first_line(e)}){_kept(part)}") from None


def _kept(part: Path) -> str:
    return f"; {decimal(_size(part))} kept in {part}: rerun the same command to resume" if _size(part) else ""


def _check(path: Path, digest: hashlib._Hash, checksum: Checksum, *, name: str, remove: bool) -> None:
    if digest.hexdigest() == checksum.hex:
        return
    if remove:
        path.unlink()
    fix = "removed the download; rerun to fetch it again" if remove else "download it again"
    raise Lav2Error(f"{name}: {checksum.kind} {digest.hexdigest()} does not match the expected {checksum.hex}; "
                    f"{fix}")


def _hash_into(digest: hashlib._Hash, path: Path) -> int:
    """Feed what `path` holds (nothing if it is missing) into `digest`; returns its size."""
    size = 0
    if path.is_file():
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
                size += len(block)
    return size


def _digest(path: Path, checksum: Checksum) -> hashlib._Hash:
    digest = checksum.new()
    _hash_into(digest, path)
    return digest


def _partial(final: Path, suffix: str) -> Path:
    return final.with_name(final.name + suffix)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _progress() -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _check_disk(needs: dict[Path, int]) -> None:
    """Fail before downloading when a filesystem lacks room; folders on one filesystem add up."""
    per_device: dict[int, tuple[Path, int]] = {}
    for folder, size in needs.items():
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        where, total = per_device.get(existing.stat().st_dev, (existing, 0))
        per_device[existing.stat().st_dev] = (where, total + size)
    for where, size in per_device.values():
        free = shutil.disk_usage(where).free
        if size > free:
            raise Lav2Error(f"not enough disk space on {where}: about {decimal(size)} needed, {decimal(free)} free "
                            "(choose --out/--home or HF_HOME on a larger disk)")


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")
