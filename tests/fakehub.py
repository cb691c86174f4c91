"""A stand-in for the Hugging Face hub and GitHub release downloads, on 127.0.0.1, for offline download tests.

It answers the routes lav2 uses:

    GET       /api/models/{repo}[/revision/{rev}]     model info: sha, siblings; with ?blobs=true each file's size,
                                                      git blob id and, for LFS files, {sha256, size, pointerSize}
    HEAD/GET  /{repo}/resolve/{rev}/{path}            the file, with X-Repo-Commit, ETag (LFS: X-Linked-Etag,
                                                      X-Linked-Size), Content-Length and Range support

and GitHub's release route, redirected to an asset URL as GitHub does:

    GET  /{owner}/{name}/releases/download/{tag}/{file}  ->  302  ->  /release-assets/{tag}/{file}

Files named like the hub's LFS defaults (LFS_SUFFIXES) are LFS files; the rest are plain git blobs. Errors carry
the headers huggingface_hub turns into its exception types (X-Error-Code: RepoNotFound, EntryNotFound,
RevisionNotFound, GatedRepo; X-Error-Message for a bad token), with the hub's statuses: a token not in
`FakeHub.tokens` gets 401 "Invalid credentials" everywhere; a gated repo answers file requests with 401 to
anonymous requests and 403 to a valid token that has not accepted its licence (`FakeRepo.accepted`).

Switches for failure tests:

- `corrupt(repo, path)`: serve that file with one byte flipped while the listing and headers announce the hashes
  of the true bytes.
- `drop_next_transfer(n, times)`: the next `times` file bodies stop after n bytes and the connection is closed.
- `stall_next_transfer(n)`: the next file body sends n bytes and then nothing more until the hub stops, once.
- `garbage_api = b"..."`: the API routes answer 200 with these bytes (`GARBAGE`: an HTML page) instead of JSON.

Every request is logged in `FakeHub.requests` with its headers and the body bytes sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

RELEASE_ROUTE = re.compile(r"^/[^/]+/[^/]+/releases/download/(?P<tag>[^/]+)/(?P<file>[^/]+)$")
ASSET_ROUTE = re.compile(r"^/release-assets/(?P<tag>[^/]+)/(?P<file>[^/]+)$")
INFO_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".model")  # a subset of the hub's default .gitattributes
GOOD_TOKEN = "hf_good_token"
GARBAGE = b"<!DOCTYPE html><html><body><h1>Welcome to the office Wi-Fi</h1></body></html>"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the hub lists as a small file's blobId and serves as its ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    accepted: set[str] = field(default_factory=lambda: {GOOD_TOKEN})  # tokens whose account accepted the licence
    sha: str = field(default_factory=lambda: secrets.token_hex(20))
    corrupt: set[str] = field(default_factory=set)

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        if not is_lfs(path):
            return {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(pointer),
                "lfs": {"sha256": sha256, "size": len(data), "pointerSize": len(pointer)}}


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0  # body bytes written to the socket


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint for HF_ENDPOINT and LAV2_RELEASE_URL."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.releases: dict[tuple[str, str], bytes] = {}
        self.tokens: set[str] = {GOOD_TOKEN}
        self.requests: list[LoggedRequest] = []
        self.garbage_api: bytes | None = None
        self._cut: tuple[str, int, int] | None = None  # ("drop" | "stall", bytes to send first, how many bodies)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        # A short poll interval keeps shutdown, and so each test's teardown, fast.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> FakeRepo:
        self.repos[repo_id] = FakeRepo(dict(files), gated=gated)
        return self.repos[repo_id]

    def add_folder(self, repo_id: str, folder: Path, *, gated: bool = False) -> FakeRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_repo(repo_id, files, gated=gated)

    def add_release(self, tag: str, filename: str, data: bytes) -> str:
        """Serve `data` as a release asset; returns its path on this server."""
        self.releases[(tag, filename)] = data
        return f"/OpenGVLab/LLaMA-Adapter/releases/download/{tag}/{filename}"

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve `path` with one byte flipped; the listing and the headers keep announcing the true hashes."""
        self.repos[repo_id].corrupt.add(path)

    def drop_next_transfer(self, after: int, times: int = 1) -> None:
        """The next `times` file bodies longer than `after` bytes stop there and the connection is closed."""
        self._cut = ("drop", after, times)

    def stall_next_transfer(self, after: int) -> None:
        """The next file body longer than `after` bytes sends that many, then nothing until the hub stops."""
        self._cut = ("stall", after, 1)

    def take_cut(self, length: int) -> tuple[str, int] | None:
        """("drop" | "stall", bytes to send) when this body of `length` bytes is to be cut."""
        with self._lock:
            if self._cut is None or length <= self._cut[1]:
                return None
            how, after, times = self._cut
            self._cut = (how, after, times - 1) if times > 1 else None
            return how, after

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()  # releases stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        self.log = LoggedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        with self.hub._lock:
            self.hub.requests.append(self.log)
        url = urlsplit(self.path)
        path = unquote(url.path)
        if m := RELEASE_ROUTE.match(path):
            if (m["tag"], m["file"]) not in self.hub.releases:
                return self._reply(404, b"Not Found", body=body)
            self._reply(302, b"", {"Location": f"/release-assets/{m['tag']}/{m['file']}"}, body=body)
        elif m := ASSET_ROUTE.match(path):
            data = self.hub.releases.get((m["tag"], m["file"]))
            if data is None:
                return self._reply(404, b"Not Found", body=body)
            self._send_file(data, {"Content-Type": "application/octet-stream"}, body=body)
        elif self._token_refused(body):
            return
        elif m := INFO_ROUTE.match(path):
            blobs = parse_qs(url.query).get("blobs", [""])[0].lower() == "true"
            self._model_info(m["repo"], m["rev"] or "main", blobs)
        elif m := RESOLVE_ROUTE.match(path):
            self._resolve(m["repo"], m["rev"], m["path"], body=body)
        else:
            self._reply(404, b"Not Found", body=body)

    def _token(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ").strip()

    def _token_refused(self, body: bool) -> bool:
        """The hub answers any request carrying an unknown token with 401, whatever the repo."""
        token = self._token()
        if not token or token in self.hub.tokens:
            return False
        headers = {"X-Error-Message": "Invalid credentials in Authorization header"}
        self._reply(401, b'{"error":"Invalid credentials in Authorization header"}', headers, body=body)
        return True

    def _repo(self, repo_id: str, rev: str, body: bool = True) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._reply(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body=body)
        elif rev not in ("main", repo.sha):
            self._reply(404, b'{"error":"Revision not found"}', {"X-Error-Code": "RevisionNotFound"}, body=body)
        else:
            return repo
        return None

    def _model_info(self, repo_id: str, rev: str, blobs: bool) -> None:
        if self.hub.garbage_api is not None:
            return self._reply(200, self.hub.garbage_api, {"Content-Type": "text/html"})
        if (repo := self._repo(repo_id, rev)) is None:
            return
        info = {
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
            "gated": "manual" if repo.gated else False,
            "siblings": [repo.sibling(name) if blobs else {"rfilename": name} for name in sorted(repo.files)],
        }
        self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, path: str, body: bool) -> None:
        if (repo := self._repo(repo_id, rev, body)) is None:
            return
        token = self._token()
        if repo.gated and token not in repo.accepted:
            status = 403 if token else 401  # as the hub: 401 anonymous, 403 signed in without access
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."}
            return self._reply(status, b'{"error":"gated"}', headers, body=body)
        data = repo.files.get(path)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}
            return self._reply(404, b'{"error":"Entry not found"}', headers, body=body)
        if is_lfs(path):
            sha256 = hashlib.sha256(data).hexdigest()
            headers = {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))}
        else:
            headers = {"ETag": f'"{git_blob_sha1(data)}"'}
        if path in repo.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        self._send_file(data, {**headers, "X-Repo-Commit": repo.sha}, body=body)

    def _send_file(self, data: bytes, headers: dict[str, str], body: bool) -> None:
        start, end = 0, len(data) - 1
        status = 200
        if (m := RANGE.match(self.headers.get("Range", ""))) is not None:
            start = int(m[1])
            end = min(int(m[2]), end) if m[2] else end
            if start >= len(data):
                return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body=body)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        headers = {**headers, "Accept-Ranges": "bytes"}
        self._reply(status, data[start:end + 1], headers, body=body, file=True)

    def _reply(self, status: int, payload: bytes, headers: dict[str, str] | None = None, body: bool = True,
               file: bool = False) -> None:
        self.log.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not body:
            return
        cut = self.hub.take_cut(len(payload)) if file else None
        sent = payload if cut is None else payload[:cut[1]]
        self.log.sent = len(sent)  # before writing: a client that has every byte may look at the log at once
        self.wfile.write(sent)
        self.wfile.flush()
        if cut is None:
            return
        if cut[0] == "stall":
            self.hub._stopping.wait()  # a server that keeps the connection open and sends nothing more
        # Close mid-body: the client sees fewer bytes than Content-Length, as on a dropped connection.
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
