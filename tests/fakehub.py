"""A stand-in for the Hugging Face hub and GitHub release downloads, on 127.0.0.1, for offline download tests.

It answers the routes huggingface_hub uses for `snapshot_download`/`hf_hub_download`:

    GET       /api/models/{repo}[/revision/{rev}]     model info: sha, siblings (with sizes)
    GET       /api/models/{repo}/tree/{rev}           the file listing snapshot_download reads
    HEAD/GET  /{repo}/resolve/{rev}/{path}            the file, with X-Repo-Commit, ETag, X-Linked-Etag,
                                                      X-Linked-Size, Content-Length and Range support

and GitHub's release route, redirected to an asset URL as GitHub does:

    GET  /{owner}/{name}/releases/download/{tag}/{file}  ->  302  ->  /release-assets/{tag}/{file}

Errors carry the headers huggingface_hub turns into its exception types (X-Error-Code: RepoNotFound,
EntryNotFound, RevisionNotFound, GatedRepo). A gated repo answers file requests with 401 unless the request
carries one of `FakeHub.tokens`. `drop_next_transfer(n)` makes the next file body stop after n bytes and close
the connection, once. Every request is logged in `FakeHub.requests` with its headers and the body bytes sent.
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
from urllib.parse import unquote, urlsplit

RELEASE_ROUTE = re.compile(r"^/[^/]+/[^/]+/releases/download/(?P<tag>[^/]+)/(?P<file>[^/]+)$")
ASSET_ROUTE = re.compile(r"^/release-assets/(?P<tag>[^/]+)/(?P<file>[^/]+)$")
INFO_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
TREE_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/.*)?$")
RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = field(default_factory=lambda: secrets.token_hex(20))


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
        self.tokens: set[str] = {"hf_good_token"}
        self.requests: list[LoggedRequest] = []
        self._drop_after: int | None = None
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

    def drop_next_transfer(self, after: int) -> None:
        """The next file body longer than `after` bytes stops there and the connection is closed."""
        self._drop_after = after

    def take_drop(self, length: int) -> int | None:
        with self._lock:
            if self._drop_after is None or length <= self._drop_after:
                return None
            after, self._drop_after = self._drop_after, None
            return after

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
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
        path = unquote(urlsplit(self.path).path)
        if m := RELEASE_ROUTE.match(path):
            if (m["tag"], m["file"]) not in self.hub.releases:
                return self._reply(404, b"Not Found", body=body)
            self._reply(302, b"", {"Location": f"/release-assets/{m['tag']}/{m['file']}"}, body=body)
        elif m := ASSET_ROUTE.match(path):
            data = self.hub.releases.get((m["tag"], m["file"]))
            if data is None:
                return self._reply(404, b"Not Found", body=body)
            self._send_file(data, {"Content-Type": "application/octet-stream"}, body=body)
        elif m := INFO_ROUTE.match(path):
            self._model_info(m["repo"], m["rev"] or "main")
        elif m := TREE_ROUTE.match(path):
            self._tree(m["repo"], m["rev"])
        elif m := RESOLVE_ROUTE.match(path):
            self._resolve(m["repo"], m["rev"], m["path"], body=body)
        else:
            self._reply(404, b"Not Found", body=body)

    def _repo(self, repo_id: str, rev: str, body: bool = True) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._reply(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body=body)
        elif rev not in ("main", repo.sha):
            self._reply(404, b'{"error":"Revision not found"}', {"X-Error-Code": "RevisionNotFound"}, body=body)
        else:
            return repo
        return None

    def _model_info(self, repo_id: str, rev: str) -> None:
        if (repo := self._repo(repo_id, rev)) is None:
            return
        info = {
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
            "gated": "manual" if repo.gated else False,
            "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())],
        }
        self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _tree(self, repo_id: str, rev: str) -> None:
        if (repo := self._repo(repo_id, rev)) is None:
            return
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(repo.files.items())
        ]
        self._reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, path: str, body: bool) -> None:
        if (repo := self._repo(repo_id, rev, body)) is None:
            return
        token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if repo.gated and token not in self.hub.tokens:
            status = 403 if token else 401  # as the hub: 401 anonymous, 403 signed in without access
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."}
            return self._reply(status, b'{"error":"gated"}', headers, body=body)
        data = repo.files.get(path)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}
            return self._reply(404, b'{"error":"Entry not found"}', headers, body=body)
        sha256 = hashlib.sha256(data).hexdigest()
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "X-Linked-Etag": f'"{sha256}"',
            "X-Linked-Size": str(len(data)),
        }
        self._send_file(data, headers, body=body)

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
        cut = self.hub.take_drop(len(payload)) if file else None
        self.wfile.write(payload if cut is None else payload[:cut])
        self.wfile.flush()
        self.log.sent = len(payload) if cut is None else cut
        if cut is not None:
            # Close mid-body: the client sees fewer bytes than Content-Length, as on a dropped connection.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
