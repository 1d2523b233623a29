"""A local stand-in for the Hugging Face Hub's HTTP API, enough for `HfApi` to push a model.

Implements the routes huggingface_hub 2.x calls for create_repo, create_branch, list_repo_files
(tree), README validation, preupload (always answering "regular", so file contents travel inline
in the commit and no LFS or Xet upload happens) and the NDJSON commit. Repositories live in
memory ({repo: {branch: {path: bytes}}}); every request is recorded.
"""

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Commit:
    repo_id: str
    revision: str
    create_pr: bool
    header: dict
    files: Dict[str, bytes]  # added
    deleted: List[str]


@dataclass
class FakeHub:
    endpoint: str = ""
    repos: Dict[str, Dict[str, Dict[str, bytes]]] = field(default_factory=dict)
    created: List[dict] = field(default_factory=list)  # create_repo payloads
    requests: List[Request] = field(default_factory=list)
    commits: List[Commit] = field(default_factory=list)

    def route(self, request: Request):
        """(status, json body, headers) for one request."""
        self.requests.append(request)
        parts = [unquote(p) for p in request.path.strip("/").split("/")]
        if request.path == "/api/repos/create":
            return self._create_repo(request.json())
        if request.path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if repo_id not in self.repos:
                return 404, {"error": f"Repository {repo_id} not found"}, {"X-Error-Code": "RepoNotFound"}
            handler = {"preupload": self._preupload, "commit": self._commit, "tree": self._tree,
                       "branch": self._branch}.get(action)
            if handler is not None:
                return handler(request, repo_id, revision)
        return 404, {"error": f"no route {request.method} {request.path}"}, {}

    def _create_repo(self, payload: dict):
        self.created.append(payload)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:  # the client reads "url" from this answer too
            return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}, {}
        self.repos[repo_id] = {"main": {}}
        return 200, {"url": f"{self.endpoint}/{repo_id}"}, {}

    def _preupload(self, request: Request, repo_id: str, revision: str):
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in request.json()["files"]]
        return 200, {"files": files}, {}

    def _branch(self, request: Request, repo_id: str, branch: str):
        branches = self.repos[repo_id]
        if branch in branches:
            return 409, {"error": "Reference already exists"}, {}
        branches[branch] = dict(branches[request.json().get("startingPoint", "main")])
        return 200, {}, {}

    def _tree(self, request: Request, repo_id: str, revision: str):
        files = self.repos[repo_id].get(revision)
        if files is None:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        return 200, [{"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                     for path, data in sorted(files.items())], {}

    def _commit(self, request: Request, repo_id: str, revision: str):
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        create_pr = request.query.get("create_pr") == ["1"]
        commit = Commit(repo_id, revision, create_pr, lines[0]["value"], {}, [])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                commit.files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                commit.deleted.append(value["path"])
            else:
                return 400, {"error": f"unsupported commit operation {line['key']!r}"}, {}
        branches = self.repos[repo_id]
        if revision not in branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        target = f"refs/pr/{len(self.commits) + 1}" if create_pr else revision
        files = dict(branches[revision])
        missing = [path for path in commit.deleted if path not in files]
        if missing:
            return 404, {"error": f"A file with this name doesn't exist: {missing}"}, {"X-Error-Code": "EntryNotFound"}
        for path in commit.deleted:
            del files[path]
        files.update(commit.files)
        branches[target] = files
        self.commits.append(commit)
        oid = hashlib.sha1(request.body).hexdigest()
        pr_url = f"{self.endpoint}/{repo_id}/discussions/{len(self.commits)}" if create_pr else None
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": pr_url}, {}


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {key.lower(): value for key, value in self.headers.items()}
            request = Request(self.command, url.path, parse_qs(url.query), headers, body)
            status, payload, headers = hub.route(request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = _serve

        def log_message(self, *args):  # keep pytest output clean
            pass

    return Handler


class HubServer:
    """Run a FakeHub on 127.0.0.1 (a free port) in a daemon thread; `stop()` shuts it down."""

    def __init__(self):
        self.hub = FakeHub()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self.hub))
        self.hub.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread: Optional[threading.Thread] = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
