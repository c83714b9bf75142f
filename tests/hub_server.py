"""`LocalHub`: an in-memory, Hub-compatible HTTP server on 127.0.0.1 for tests, and `hub_env` to point at it.

The server (standard library only) speaks the subset of the Hugging Face Hub API that `huggingface_hub` and
`transformers` use to create repos, commit regular (non-LFS) files and read them back: repo creation, YAML
validation, repo info, tree listing, refs, preupload, NDJSON commits and `resolve` downloads, with the
`X-Error-Code` headers that make the client raise `RepositoryNotFoundError`, `RevisionNotFoundError` and
`EntryNotFoundError`; plus branch creation and `whoami` (401 without the right token). Repos are git-like: a list of commits, each holding the full file
map after it, and branches naming commits (`main` is created with the repo, holding `.gitattributes`, as on
the Hub). Not supported: LFS/Xet uploads, pull requests, tags, access control of private repos (`private` is
only reported).

`hub_env` is the client side: `huggingface_hub` copies `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_OFFLINE`... into
module constants at import time and bakes the endpoint into long-lived `HfApi` objects, so setting environment
variables is not enough once it is imported; `hub_env` patches those copies too.

Usage::

    with LocalHub(token="secret") as hub, hub_env(hub):
        create_repo("user/demo")
        upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="user/demo")
        assert Path(hf_hub_download("user/demo", "a.txt")).read_bytes() == b"hi"
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, unquote, urlsplit

API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
"""URL segment after `/api/` -> repo type."""

WEB_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
"""Repo type -> prefix of its web and `resolve` URLs."""

GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
"""Content of the `.gitattributes` file that the Hub commits when it creates a repo."""


def git_blob_oid(data: bytes) -> str:
    """Git blob id of `data` (`git hash-object`): the Hub's ETag and oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(date: datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Commit:
    """One commit: 40-hex id, message, date and the full file map (path -> bytes) after it."""

    oid: str
    message: str
    date: datetime
    files: Mapping[str, bytes]


@dataclass
class Repo:
    """A repository: its commits (oldest first) and branches (name -> commit id)."""

    repo_id: str
    repo_type: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """The commit named by a branch or a full commit id; `RevisionNotFound` otherwise."""
        oid = self.branches.get(revision, revision)
        for commit in self.commits:
            if commit.oid == oid:
                return commit
        raise HubError(HTTPStatus.NOT_FOUND, f"Invalid rev id: {revision}", code="RevisionNotFound")


@dataclass
class Response:
    """What the server sends back: status, headers and body."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(data: Any) -> Response:
    return Response(HTTPStatus.OK, json.dumps(data).encode(), {"Content-Type": "application/json"})


class HubError(Exception):
    """An error answer: JSON `{"error": message, **fields}`, with the Hub's `X-Error-Code` / `X-Error-Message`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        **fields: str,
    ) -> None:
        super().__init__(message)
        body = json.dumps({"error": message, **fields}).encode()
        self.response = Response(status, body, {**(headers or {}), "Content-Type": "application/json"})
        self.response.headers["X-Error-Message"] = message
        if code is not None:
            self.response.headers["X-Error-Code"] = code


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # snapshot_download opens several connections at once

    def __init__(self, hub: LocalHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        response = self.server.hub.handle(self.command, self.path, self.headers, body)
        self.send_response(response.status)
        for name, value in {**response.headers, "Content-Length": str(len(response.body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


class LocalHub:
    """In-memory Hub on `http://127.0.0.1:<ephemeral port>`; a context manager that starts and stops it.

    `token`: when set, write requests (create repo or branch, preupload, commit) without
    `Authorization: Bearer <token>` get 401. `user`: namespace of repos created without one. `home` is a
    fresh temporary folder, meant as `HF_HOME` (see `hub_env`), removed by `stop()`.
    """

    def __init__(self, token: str | None = None, user: str = "user") -> None:
        self.token = token
        self.user = user
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._home: str | None = None

    @property
    def endpoint(self) -> str:
        """`http://127.0.0.1:PORT`, while running."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def home(self) -> Path:
        """Temporary folder for `HF_HOME`, while running."""
        if self._home is None:
            raise RuntimeError("LocalHub is not running")
        return Path(self._home)

    def start(self) -> LocalHub:
        """Bind an ephemeral loopback port and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("LocalHub is already running")
        self._home = tempfile.mkdtemp(prefix="localhub-")
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and remove `home`; repos are kept. No-op when not running."""
        if self._server is None or self._thread is None or self._home is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        shutil.rmtree(self._home, ignore_errors=True)
        self._server = self._thread = self._home = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """History of a repo, oldest first (the first one is the `.gitattributes` commit of its creation)."""
        with self._lock:
            return list(self._repo(repo_type, repo_id).commits)

    # ----- HTTP -----

    def handle(self, method: str, target: str, headers: Message, body: bytes) -> Response:
        """Answer one request; `target` is the raw (still URL-encoded) request target."""
        url = urlsplit(target)
        # Split before decoding: an encoded revision such as `refs%2Fpr%2F1` stays one segment.
        parts = [unquote(part) for part in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        try:
            with self._lock:
                return self._route(method, parts, query, headers, body)
        except HubError as error:
            return error.response
        except (KeyError, TypeError, ValueError) as error:  # malformed JSON, NDJSON or base64
            return HubError(HTTPStatus.BAD_REQUEST, f"Malformed request: {error!r}").response

    def _route(
        self, method: str, parts: list[str], query: dict[str, list[str]], headers: Message, body: bytes
    ) -> Response:
        if parts[:1] == ["api"]:
            if method == "POST" and parts == ["api", "repos", "create"]:
                self._authorize(headers)
                return self._create_repo(json.loads(body))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            if method == "GET" and parts == ["api", "whoami-v2"]:
                if headers.get("Authorization") is None:
                    raise HubError(HTTPStatus.UNAUTHORIZED, "No token in Authorization header")
                self._authorize(headers)
                return _json({"type": "user", "name": self.user})
            if len(parts) >= 4 and parts[1] in API_TYPES:
                repo = self._repo(API_TYPES[parts[1]], f"{parts[2]}/{parts[3]}")
                return self._repo_api(repo, method, parts[4:], query, headers, body)
        elif method in ("GET", "HEAD"):
            repo_type, rest = "model", parts
            if parts[0] in ("datasets", "spaces"):  # model URLs have no type prefix
                repo_type, rest = API_TYPES[parts[0]], parts[1:]
            if len(rest) >= 5 and rest[2] == "resolve":
                return self._resolve(self._repo(repo_type, f"{rest[0]}/{rest[1]}"), rest[3], "/".join(rest[4:]))
        raise HubError(HTTPStatus.NOT_FOUND, f"Not found: {method} /{'/'.join(parts)}")

    def _repo_api(
        self,
        repo: Repo,
        method: str,
        rest: list[str],
        query: dict[str, list[str]],
        headers: Message,
        body: bytes,
    ) -> Response:
        if method == "GET":
            if not rest or (len(rest) == 2 and rest[0] == "revision"):
                return self._info(repo, repo.resolve(rest[1] if rest else "main"), "true" in query.get("blobs", []))
            if len(rest) >= 2 and rest[0] == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._tree(repo.resolve(rest[1]), "/".join(rest[2:]), recursive)
            if rest == ["refs"]:
                branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()]
                return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            self._authorize(headers)
            return self._create_branch(repo, rest[1], json.loads(body or b"{}").get("startingPoint", "main"))
        if method == "POST" and len(rest) == 2 and rest[0] in ("preupload", "commit"):
            self._authorize(headers)
            if "create_pr" in query:
                raise HubError(HTTPStatus.BAD_REQUEST, "LocalHub does not support pull requests")
            if rest[0] == "preupload":
                return self._preupload(repo.resolve(rest[1]), json.loads(body))
            return self._commit(repo, rest[1], [json.loads(line) for line in body.splitlines() if line.strip()])
        raise HubError(HTTPStatus.NOT_FOUND, f"Not found: {method} {'/'.join(rest)} on {repo.repo_id}")

    def _authorize(self, headers: Message) -> None:
        if self.token is not None and headers.get("Authorization") != f"Bearer {self.token}":
            raise HubError(HTTPStatus.UNAUTHORIZED, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(HTTPStatus.NOT_FOUND, "Repository not found", code="RepoNotFound")
        return repo

    def _url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{WEB_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # ----- endpoints -----

    def _create_repo(self, payload: dict[str, Any]) -> Response:
        repo_type = payload.get("type") or "model"
        if repo_type not in WEB_PREFIXES:
            raise HubError(HTTPStatus.BAD_REQUEST, f"Unsupported repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if (repo_type, repo_id) in self._repos:
            url = self._url(self._repos[repo_type, repo_id])
            raise HubError(HTTPStatus.CONFLICT, f"You already created this {repo_type} repo", url=url)
        repo = Repo(repo_id, repo_type, private=payload.get("visibility") == "private")
        self._repos[repo_type, repo_id] = repo
        self._add_commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES})
        return _json({"url": self._url(repo), "name": repo_id, "id": repo_id})

    def _create_branch(self, repo: Repo, branch: str, starting_point: str) -> Response:
        if branch in repo.branches:
            raise HubError(HTTPStatus.CONFLICT, f"Branch {branch} already exists")
        repo.branches[branch] = repo.resolve(starting_point).oid
        return _json({})

    def _info(self, repo: Repo, commit: Commit, blobs: bool) -> Response:
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_oid(data)} if blobs else {})}
            for path, data in sorted(commit.files.items())
        ]
        return _json(
            {
                "_id": repo.repo_id,
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.commits[0].date),
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, commit: Commit, folder: str, recursive: bool) -> Response:
        prefix = f"{folder}/" if folder else ""
        below = {path[len(prefix) :]: data for path, data in commit.files.items() if path.startswith(prefix)}
        if folder and not below:
            raise HubError(HTTPStatus.NOT_FOUND, f"{folder} does not exist", code="EntryNotFound")
        files: dict[str, bytes] = {}
        folders: set[str] = set()
        for path, data in below.items():
            dirs = path.split("/")[:-1]
            if recursive:
                files[prefix + path] = data
                folders.update(prefix + "/".join(dirs[:depth]) for depth in range(1, len(dirs) + 1))
            elif dirs:
                folders.add(prefix + dirs[0])
            else:
                files[prefix + path] = data
        entries: list[dict[str, Any]] = [
            {
                "type": "directory",
                "path": path,
                "size": 0,
                "oid": _tree_oid({p: d for p, d in commit.files.items() if p.startswith(path + "/")}),
            }
            for path in sorted(folders)
        ]
        entries += [
            {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
            for path, data in sorted(files.items())
        ]
        return _json(entries)

    def _preupload(self, commit: Commit, payload: dict[str, Any]) -> Response:
        files = [
            {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(commit.files[item["path"]]) if item["path"] in commit.files else None,
            }
            for item in payload["files"]
        ]
        return _json({"files": files})

    def _commit(self, repo: Repo, branch: str, lines: list[dict[str, Any]]) -> Response:
        if branch not in repo.branches:
            raise HubError(HTTPStatus.NOT_FOUND, f"Invalid branch: {branch}", code="RevisionNotFound")
        head = repo.resolve(branch)
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            raise HubError(HTTPStatus.BAD_REQUEST, "Missing commit header")
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(HTTPStatus.PRECONDITION_FAILED, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(HTTPStatus.NOT_FOUND, "A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(folder)}
            elif key != "header":
                raise HubError(HTTPStatus.BAD_REQUEST, f"LocalHub does not support {key!r} commit entries")
        commit = self._add_commit(repo, branch, header["summary"], files)
        return _json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )

    def _resolve(self, repo: Repo, revision: str, path: str) -> Response:
        commit = repo.resolve(revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(
                HTTPStatus.NOT_FOUND, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
        }
        return Response(HTTPStatus.OK, data, headers)

    def _add_commit(self, repo: Repo, branch: str, message: str, files: Mapping[str, bytes]) -> Commit:
        parent = repo.branches.get(branch, "")
        content = f"tree {_tree_oid(files)}\nparent {parent}\nserial {next(self._ids)}\n\n{message}"
        oid = hashlib.sha1(content.encode()).hexdigest()
        commit = Commit(oid, message, datetime.now(timezone.utc), MappingProxyType(dict(files)))
        repo.commits.append(commit)
        repo.branches[branch] = oid
        return commit


def _tree_oid(files: Mapping[str, bytes]) -> str:
    """A 40-hex id of a file map (not git's tree encoding, but as content-addressed)."""
    return hashlib.sha1("".join(f"{p}\0{git_blob_oid(d)}\n" for p, d in sorted(files.items())).encode()).hexdigest()


@contextmanager
def hub_env(hub: LocalHub | None = None, token: str | None = None, *, endpoint: str | None = None) -> Iterator[None]:
    """Point `huggingface_hub` (and `transformers`, if loaded) at a running `hub`; restore everything on exit.

    Sets the environment (`HF_ENDPOINT`, `HF_HOME` = `hub.home`, `HF_HUB_CACHE`, `HF_TOKEN` = `token` or
    `hub.token`, `HF_HUB_OFFLINE=0`, `HF_HUB_DISABLE_TELEMETRY=1`, the endpoint's host in `NO_PROXY`) and,
    because an imported client has already copied those values, patches what holds the copies: the
    `huggingface_hub.constants` derived from them, the endpoint of the module-level `HfApi` behind
    `create_repo`, `upload_file`, `model_info`..., and the cached `HfApi` of `transformers`. The shared HTTP
    client is closed on entry and exit so that it is rebuilt with this environment's proxy settings.

    Instead of `hub`, an `endpoint` alone may be given (e.g. a stopped hub's, to test an unreachable Hub); the
    cache then lives in a temporary folder of its own.
    """
    from huggingface_hub import close_session, constants, hf_api

    if (hub is None) == (endpoint is None):
        raise TypeError("hub_env() takes exactly one of `hub` and `endpoint`")
    with ExitStack() as stack:
        if hub is not None:
            endpoint, home = hub.endpoint, hub.home
            token = hub.token if token is None else token
        else:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="localhub-")))
        assert endpoint is not None
        host = urlsplit(endpoint).hostname or ""
        env = {
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"),
            "HF_ASSETS_CACHE": str(home / "assets"),
            "HF_XET_CACHE": str(home / "xet"),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), host])),
            "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy"), host])),
        }
        patched_constants = {
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": constants.HF_URL_HOSTS | {host},
            "HF_HOME": env["HF_HOME"],
            "HF_HUB_CACHE": env["HF_HUB_CACHE"],
            "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
            "HF_XET_CACHE": env["HF_XET_CACHE"],
            "HF_TOKEN_PATH": str(home / "token"),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        }
        stack.enter_context(mock.patch.dict(os.environ, env))
        # Tokens from elsewhere must not win over (or stand in for) the one given here.
        for name in ["HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN"]:
            os.environ.pop(name, None)
        if token is not None:
            os.environ["HF_TOKEN"] = token
        for name, value in patched_constants.items():
            stack.enter_context(mock.patch.object(constants, name, value))
        stack.enter_context(mock.patch.object(hf_api.api, "endpoint", endpoint))
        previous = getattr(sys.modules.get("transformers.utils.hub"), "_hf_api", None)
        _set_transformers_api(None)
        stack.callback(_set_transformers_api, previous)
        close_session()
        stack.callback(close_session)
        yield


def _set_transformers_api(api: Any) -> None:
    """Set `transformers`' shared `HfApi`, which it builds on first use with the endpoint of that moment."""
    module = sys.modules.get("transformers.utils.hub")
    if module is not None:
        vars(module)["_hf_api"] = api


def load_dataset(hub: LocalHub, repo_id: str, cache: Path) -> Any:
    """``datasets.load_dataset(repo_id)`` through the loopback Hub. datasets copies ``HF_ENDPOINT`` and the offline
    flag at import time, so those copies are pointed at ``hub``; and it would ping two other hosts (a download
    counter on S3, the dataset viewer's ``datasets-server.`` + endpoint host), so both are off. Returns the
    ``datasets.Dataset`` of its ``train`` split."""
    import datasets

    with mock.patch.multiple(datasets.config, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE=False,
                             HF_UPDATE_DOWNLOAD_COUNTS=False, USE_PARQUET_EXPORT=False):
        return datasets.load_dataset(repo_id, split="train", cache_dir=str(cache))
