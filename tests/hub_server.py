"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for testing the real huggingface_hub
client without the internet. It implements what create_repo, create_commit (preupload, LFS batch
upload, NDJSON commit), list_repo_files/tree, repo_info and snapshot_download/hf_hub_download
(resolve with X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size) use, with files kept in memory.
Test-only: not part of the package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool, gated: bool = False):
        self.private = private
        self.gated = gated
        self.branches: dict[str, str] = {}
        self.commits: dict[str, dict[str, dict]] = {}  # sha -> path -> {"data", "lfs"}
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.commits[sha] = {}
        self.branches["main"] = sha
        self.prs = 0

    def resolve(self, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.commits:
            return rev
        return None


class HubState:
    def __init__(self, token: str | None = None):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.token = token
        self.auth_seen: list[str] = []
        self.requests: list[str] = []


def make_handler(state: HubState, base_url: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # ---------------------------------------------------------------- helpers
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head=False):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers=None):
            h = {"Content-Type": "application/json", **(headers or {})}
            self._send(status, json.dumps(obj).encode(), h)

        def _error(self, status: int, code: str, message: str, head=False):
            self._send(status, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}, head)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _authorized(self, repo: Repo | None) -> bool:
            auth = self.headers.get("Authorization", "")
            if auth:
                state.auth_seen.append(auth)
            if repo is None or not repo.private:
                return True
            return state.token is not None and auth == f"Bearer {state.token}"

        def _repo(self, repo_id: str, head=False):
            repo = state.repos.get(repo_id)
            if repo is not None and repo.gated and self.command in ("GET", "HEAD"):
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted", head)
                return None
            if repo is None or not self._authorized(repo):
                self._error(401 if repo is not None else 404, "RepoNotFound", f"Repository {repo_id} not found", head)
                return None
            return repo

        def _at(self, repo_id: str, rev: str, head=False):
            """(repo, commit sha) for a repo and revision, or None after answering 401/404."""
            repo = self._repo(repo_id, head)
            if repo is None:
                return None
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return None
            return repo, sha

        # ---------------------------------------------------------------- routes
        def do_HEAD(self):
            self._resolve(head=True)

        def do_GET(self):
            state.requests.append("GET " + self.path)
            url = urlparse(self.path)
            path = url.path
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
            if m:
                return self._revision(m[1], m[2])
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
            if m:
                return self._tree(m[1], m[2], (m[3] or "").lstrip("/"))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)
            if m:
                return self._revision(m[1], "main")
            if path == "/api/whoami-v2":
                return self._json(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
            return self._resolve()

        def do_PUT(self):
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", urlparse(self.path).path)
            if not m:
                return self._error(404, "NotFound", "no such upload")
            data = self._body()
            if hashlib.sha256(data).hexdigest() != m[1]:
                return self._error(400, "BadRequest", "sha256 mismatch")
            state.lfs[m[1]] = data
            self._send(200)

        def do_POST(self):
            state.requests.append("POST " + self.path)
            url = urlparse(self.path)
            path = url.path
            query = parse_qs(url.query)
            body = self._body()
            if path == "/api/repos/create":
                return self._create(json.loads(body or b"{}"))
            if path == "/api/validate-yaml":  # the client checks a README's front matter before a commit
                return self._json(200, {"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
            if m:
                return self._preupload(m[1], json.loads(body))
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m:
                return self._lfs_batch(m[1], json.loads(body))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
            if m:
                return self._commit(m[1], unquote(m[2]), body, query.get("create_pr", ["0"])[0] in ("1", "true"))
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
            if m:
                repo = self._repo(m[1])
                if repo is None:
                    return
                repo.branches.setdefault(unquote(m[2]), repo.branches["main"])
                return self._json(200, {})
            self._error(404, "NotFound", f"no route for POST {path}")

        # ---------------------------------------------------------------- handlers
        def _create(self, req):
            name = req.get("name")
            org = req.get("organization") or "tester"
            repo_id = f"{org}/{name}"
            if repo_id in state.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{base_url}/{repo_id}"})
            if not self._authorized(None) or not self.headers.get("Authorization"):
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            state.repos[repo_id] = Repo(bool(req.get("private")) or req.get("visibility") == "private")
            self._json(200, {"url": f"{base_url}/{repo_id}", "name": repo_id})

        def _revision(self, repo_id, rev):
            found = self._at(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0,
                             "likes": 0, "lastModified": "2026-11-23T00:00:00.000Z"})

        def _entry(self, p, f):
            data = f["data"]
            e = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": p}
            if f["lfs"]:
                e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return e

        def _tree(self, repo_id, rev, sub):
            found = self._at(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            entries = [self._entry(p, f) for p, f in sorted(files.items()) if p.startswith(sub)]
            self._json(200, entries)

        def _preupload(self, repo_id, req):
            if self._repo(repo_id) is None:
                return
            out = []
            for f in req.get("files", []):
                lfs = f["path"].endswith((".safetensors", ".bin", ".gguf")) or f["size"] > 10_000_000
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": None})
            self._json(200, {"files": out, "commitOid": None})

        def _lfs_batch(self, repo_id, req):
            if self._repo(repo_id) is None:
                return
            objs = []
            for o in req.get("objects", []):
                entry = {"oid": o["oid"], "size": o["size"]}
                if o["oid"] not in state.lfs:
                    entry["actions"] = {"upload": {"href": f"{base_url}/lfs-upload/{o['oid']}"}}
                objs.append(entry)
            self._json(200, {"transfer": "basic", "objects": objs}, {"Content-Type": "application/vnd.git-lfs+json"})

        def _commit(self, repo_id, rev, body, create_pr):
            found = self._at(repo_id, rev)
            if found is None:
                return
            repo, parent = found
            files = dict(repo.commits[parent])
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = {"data": base64.b64decode(value["content"]), "lfs": False}
                elif key == "lfsFile":
                    if value["oid"] not in state.lfs:
                        return self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = {"data": state.lfs[value["oid"]], "lfs": True}
                elif key == "deletedFile":
                    files.pop(value["path"], None)
            sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
            repo.commits[sha] = files
            result = {"commitUrl": f"{base_url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}
            if create_pr:
                repo.prs += 1
                repo.branches[f"refs/pr/{repo.prs}"] = sha
                result["pullRequestUrl"] = f"{base_url}/{repo_id}/discussions/{repo.prs}"
            else:
                repo.branches[rev] = sha
            self._json(200, result)

        def _resolve(self, head=False):
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urlparse(self.path).path)
            if not m:
                return self._error(404, "NotFound", "no route", head)
            found = self._at(m[1], m[2], head)
            if found is None:
                return
            repo, sha = found
            f = repo.commits[sha].get(unquote(m[3]))
            if f is None:
                return self._error(404, "EntryNotFound", f"{m[3]} does not exist", head)
            data = f["data"]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"', "Content-Length": str(len(data)),
                       "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            if f["lfs"]:
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = str(len(data))
            self._send(200, data, headers, head)

    return Handler


class HubServer:
    """``with HubServer() as hub:`` → hub.url, hub.state; serves until the block ends."""

    def __init__(self, token: str | None = None):
        self.state = HubState(token)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), None)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.httpd.RequestHandlerClass = make_handler(self.state, self.url)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
