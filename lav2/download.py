"""Model registry and fetching: `lav2 download 7b` fetches the LLaMA base, the official adapter and CLIP, then imports.

Three kinds of source files, each fetched the way its host expects:

- Hugging Face repos (the LLaMA base, the open_clip CLIP) through huggingface_hub's `snapshot_download`, so its
  cache, retries, `HF_ENDPOINT` and `HF_TOKEN` behave as everywhere else. Both variables are read per call.
- The official LLaMA-Adapter V2 files, GitHub release assets named `<sha256>_<NAME>.pth`, streamed into
  `$LAV2_HOME/downloads/<file>.part` with HTTP Range resume and checked against the sha256 in their name before
  use. `LAV2_RELEASE_URL` (default https://github.com) replaces the host, for mirrors and tests.
- Local folders and files, used as they are.

`fetch` gets the files; `download` fetches and hands them to `lav2.checkpoint.import_model`, which writes the model
folder. Every failure a user can fix is a one-line `Lav2Error`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
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
            needs[out.parent] += sum(plan.files.values())
    if release:
        needs[downloads] = _release_missing_bytes(release, downloads)
        needs[out.parent] += release.size
    for local in (base, adapter_path, clip_source):
        if isinstance(local, Path):
            needs[out.parent] += sum(p.stat().st_size for p in (local.rglob("*") if local.is_dir() else [local]))
    _check_disk(needs)

    if release:
        adapter_path = _fetch_release(release, downloads)
    clip_path = hub.get(clip_files) if clip_files else (Path(clip_source) if clip_source else None)
    base_path = hub.get(base_files) if base_files else Path(base)
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
class _HubPlan:
    repo: str
    sha: str
    files: dict[str, int]  # repo path -> size in bytes


class _Hub:
    """huggingface_hub calls with the endpoint, token and cache read now, not when huggingface_hub was imported."""

    def __init__(self, token: str | None) -> None:
        self.token = token  # None: huggingface_hub uses HF_TOKEN or the stored login
        self.endpoint = os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT).rstrip("/")
        hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
        self.cache = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub").expanduser()

    def plan(self, repo: str, choose: Callable[[str, list[str]], list[str]]) -> _HubPlan:
        """List the repo once, so the files and their sizes are known before anything is downloaded."""
        with _hub_errors(repo, self.endpoint):
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(repo, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        assert info.sha is not None
        return _HubPlan(repo, info.sha, {f: sizes[f] for f in choose(repo, list(sizes))})

    def missing_bytes(self, plan: _HubPlan) -> int:
        cached = (try_to_load_from_cache(plan.repo, f, cache_dir=self.cache, revision=plan.sha) for f in plan.files)
        return sum(size for size, hit in zip(plan.files.values(), cached) if not isinstance(hit, str))

    def get(self, plan: _HubPlan) -> Path:
        with _hub_errors(plan.repo, self.endpoint):
            # Pinning the listed commit keeps the files consistent with the sizes checked above.
            folder = snapshot_download(plan.repo, revision=plan.sha, allow_patterns=list(plan.files),
                                       cache_dir=self.cache, endpoint=self.endpoint, token=self.token)
        return Path(folder)


@contextmanager
def _hub_errors(repo: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line that says what to do."""
    host = urlsplit(endpoint).netloc
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
        if status in (401, 403):
            raise Lav2Error(_gated(repo)) from None
        if status == 404:
            raise Lav2Error(f"{repo} not found on {host}; registry names: {', '.join(REGISTRY)}") from None
        raise Lav2Error(f"{host} answered {status} for {repo}: {_first_line(e)}") from None
    except (httpx2.ConnectError, httpx2.TimeoutException) as e:
        raise Lav2Error(_offline(host, e)) from None
    except OfflineModeIsEnabled:
        raise Lav2Error(f"HF_HUB_OFFLINE is set, so {repo} cannot be fetched: unset it, or give a local model "
                        "folder instead") from None
    except LocalEntryNotFoundError as e:
        # snapshot_download reports an unreachable hub this way, with the network error as the cause.
        cause = e.__cause__
        if isinstance(cause, (httpx2.ConnectError, httpx2.TimeoutException)):
            raise Lav2Error(_offline(host, cause)) from None
        raise Lav2Error(f"could not fetch {repo} from {host}: {_first_line(e)}") from None
    except (httpx2.TransportError, OSError) as e:
        raise Lav2Error(f"download of {repo} interrupted ({_first_line(e)}); rerun the same command to resume "
                        "(finished files are kept in the Hugging Face cache)") from None


def _gated(repo: str) -> str:
    return (f"{repo} is gated: accept its licence at https://huggingface.co/{repo} with your account, then set "
            "HF_TOKEN or pass --token")


def _offline(host: str, error: BaseException) -> str:
    return (f"cannot reach {host} ({_first_line(error) or type(error).__name__}): lav2 download needs network "
            "access, or give a local model folder instead")


# --- official release files ------------------------------------------------------------------------------------------


def _release_missing_bytes(release: Release, folder: Path) -> int:
    if (folder / release.filename).is_file():
        return 0
    part = folder / (release.filename + ".part")
    return max(release.size - (part.stat().st_size if part.is_file() else 0), 0)


def _fetch_release(release: Release, folder: Path) -> Path:
    """Stream a release asset into FILE.part, resuming with a Range request, and verify its sha256."""
    final = folder / release.filename
    if final.is_file():
        return final  # only verified files get their final name
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / (release.filename + ".part")
    url = release.url(os.environ.get("LAV2_RELEASE_URL", "https://github.com"))
    host = urlsplit(url).netloc
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "lav2", **({"Range": f"bytes={have}-"} if have else {})}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we have: the part is complete
            return _finish_release(release, part, final)
        if e.code == 404:
            raise Lav2Error(f"{release.name} not found at {url}; check LAV2_RELEASE_URL") from None
        raise Lav2Error(f"{host} answered {e.code} for {url}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise Lav2Error(_offline(host, reason if isinstance(reason, BaseException) else e)) from None

    with response:
        if response.status != 206:
            have = 0  # the server ignored the Range header: start over rather than append a second copy
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with part.open("ab" if have else "wb") as f, _progress() as progress:
            task = progress.add_task(release.name, total=total, completed=have)
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    progress.advance(task, len(chunk))
            except (HTTPException, OSError):
                pass  # the size check below reports the interruption
    size = part.stat().st_size
    if total is not None and size < total:
        raise Lav2Error(f"download of {release.name} interrupted at {decimal(size)} of {decimal(total)}; rerun "
                        f"the same command to resume from {part}")
    return _finish_release(release, part, final)


def _finish_release(release: Release, part: Path, final: Path) -> Path:
    _verify_sha256(part, release.sha256, remove=True)
    part.replace(final)
    return final


def _verify_sha256(path: Path, expected: str, *, remove: bool) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    if digest.hexdigest() != expected:
        if remove:
            path.unlink()
        fix = "removed it; rerun to download again" if remove else "download it again"
        raise Lav2Error(f"{path.name.removesuffix('.part')}: sha256 {digest.hexdigest()[:12]}… does not match "
                        f"the expected {expected[:12]}…; {fix}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))


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
