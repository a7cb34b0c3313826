"""Artifacts for jobs: an HTTPS file server with short-lived signed URLs, like S3 presigned URLs.

A job document may hold `${aws:iot:s3-presigned-url:https://s3.amazonaws.com/BUCKET/KEY}`; when the
document is delivered to a device the placeholder becomes `https://localhost:PORT/KEY?X-Expires=…
&X-Signature=…` (HMAC-SHA256, valid `ttl_s`), served from DIR/artifacts/KEY. The server answers
single byte ranges (`Range: bytes=a-b`, 206) so downloads can resume, refuses expired or forged
URLs with 403, and never serves a path outside the artifacts folder.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(r"\$\{aws:iot:s3-presigned-url:(https://[^}]+)\}")
KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def key_from_s3_url(url: str) -> str:
    """'https://s3.<region>.amazonaws.com/bucket/a/b.bin' or 'https://bucket.s3…/a/b.bin' -> 'a/b.bin'."""
    u = urllib.parse.urlparse(url)
    parts = [p for p in u.path.split("/") if p]
    if u.netloc.startswith("s3.") or u.netloc.startswith("s3-"):
        parts = parts[1:]  # path-style: the first element is the bucket
    return "/".join(parts)


@dataclass(eq=False)
class Artifacts:
    directory: Path
    secret: bytes
    port: int = 0
    ttl_s: int = 3600

    @classmethod
    def open(cls, cloud_dir: Path) -> Artifacts:
        from .pki import private_dir

        # The URL-signing key: anyone who reads it can mint download URLs. pki/ is 0700, the key 0600
        # from creation (O_EXCL: two processes opening the cloud at once never share a half-written key).
        secret_path = private_dir(cloud_dir / "pki") / "url-secret"
        try:
            fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if secret_path.stat().st_mode & 0o077:
                secret_path.chmod(0o600)  # written by an older version
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return cls(cloud_dir / "artifacts", secret_path.read_bytes())

    def put(self, src: Path, key: str | None = None) -> str:
        key = key or src.name
        if not KEY_RE.match(key) or ".." in key.split("/"):
            raise ValueError(f"artifact key {key!r}: use letters, digits, '.', '_', '-' and '/'")
        dst = self.directory / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return f"${{aws:iot:s3-presigned-url:https://s3.amazonaws.com/localcloud/{key}}}"

    def sign(self, key: str, expires: int) -> str:
        return hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.ttl_s)
        q = urllib.parse.urlencode({"X-Expires": expires, "X-Signature": self.sign(key, expires)})
        return f"https://localhost:{self.port}/{urllib.parse.quote(key)}?{q}"

    def resolve(self, doc: Any) -> Any:
        """The job document with every presigned-URL placeholder replaced (strings anywhere in it)."""
        if isinstance(doc, str):
            return PLACEHOLDER.sub(lambda m: self.url(key_from_s3_url(m.group(1))), doc)
        if isinstance(doc, list):
            return [self.resolve(x) for x in doc]
        if isinstance(doc, dict):
            return {k: self.resolve(v) for k, v in doc.items()}
        return doc

    def check(self, path: str, query: str, now: float | None = None) -> Path | None:
        key = urllib.parse.unquote(path.lstrip("/"))
        q = urllib.parse.parse_qs(query)
        try:
            expires = int(q["X-Expires"][0])
            sig = q["X-Signature"][0]
        except (KeyError, ValueError, IndexError):
            return None
        if not KEY_RE.match(key) or ".." in key.split("/"):
            return None
        if (time.time() if now is None else now) > expires or not hmac.compare_digest(sig, self.sign(key, expires)):
            return None
        p = (self.directory / key).resolve()
        if self.directory.resolve() not in p.parents or not p.is_file():
            return None
        return p

    def serve(self, cert: Path, key: Path) -> ThreadingHTTPServer:
        store = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "localcloud-artifacts"

            def log_message(self, fmt, *args):  # quiet; the service log has what matters
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                u = urllib.parse.urlparse(self.path)
                p = store.check(u.path, u.query)
                if p is None:
                    self.send_error(403, "expired, forged or unknown URL")
                    return
                size = p.stat().st_size
                start, end, status = 0, size - 1, 200
                rng = self.headers.get("Range")
                if rng:
                    m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
                    if not m or (not m.group(1) and not m.group(2)):
                        self.send_error(416)
                        return
                    if m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    else:
                        start = max(0, size - int(m.group(2)))
                    if start > end or start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if body:
                    with open(p, "rb") as f:
                        f.seek(start)
                        left = end - start + 1
                        while left > 0:
                            chunk = f.read(min(1 << 20, left))
                            if not chunk:
                                break
                            self.wfile.write(chunk)
                            left -= len(chunk)

        srv = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self.port = srv.server_address[1]
        threading.Thread(target=srv.serve_forever, name="artifacts-https", daemon=True).start()
        return srv
