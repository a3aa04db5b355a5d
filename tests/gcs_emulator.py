"""An in-memory Google Cloud Storage server speaking the JSON API, for tests of ``gs://`` run roots.

Both clients a run uses go through it: ``gcsfs`` (the ``etils.epath`` backend of every file the library writes;
``STORAGE_EMULATOR_HOST``) and TensorStore (Orbax's checkpoint arrays; ``TENSORSTORE_GCS_HTTP_URL``). It keeps what
they rely on and a partial emulator (``gcp-storage-emulator``) gets wrong: object generations in the
``x-goog-generation`` header and the ``ifGenerationMatch`` / ``ifGenerationNotMatch`` preconditions (TensorStore's
OCDBT manifests are written by compare-and-swap), byte ranges, resumable uploads, listing by prefix and delimiter,
and moving, rewriting and copying objects. Only the calls these two clients make are implemented; anything else is
a 501 that names the request, so a client that starts using a new call fails loudly here.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading
import uuid
from urllib.parse import parse_qs, quote, unquote, urlsplit


class _Bucket:
    def __init__(self):
        self.objects: dict[str, tuple[bytes, int, str]] = {}  # name -> (data, generation, content type)


class GCSEmulator:
    """``with GCSEmulator(["bkt"]) as emulator:`` serves ``emulator.url`` until the block ends."""

    def __init__(self, buckets=("bucket",)):
        self.buckets = {name: _Bucket() for name in buckets}
        self.uploads: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self._generation = 1_000
        emulator = self

        class Handler(_Handler):
            state = emulator

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def environment(self) -> dict[str, str]:
        """What the clients read to reach this server instead of Google's (and to send no credentials)."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCE_METADATA_HOST": "127.0.0.1:1"}

    def names(self, bucket: str) -> list[str]:
        with self.lock:
            return sorted(self.buckets[bucket].objects)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def resource(bucket: str, name: str, data: bytes, generation: int, content_type: str) -> dict:
    return {"kind": "storage#object", "bucket": bucket, "name": name, "id": f"{bucket}/{name}/{generation}",
            "size": str(len(data)), "generation": str(generation), "metageneration": "1",
            "contentType": content_type, "storageClass": "STANDARD",
            "timeCreated": "2026-01-01T00:00:00.000Z", "updated": "2026-01-01T00:00:00.000Z"}


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client hanging up is not news
            super().handle_error(request, client_address)


class _Failure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: GCSEmulator

    def log_message(self, *args):  # quiet: the requests are kept in state.requests
        pass

    # --- plumbing -------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if payload or status not in (204, 304):
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, status: int, payload: dict, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self):
        body = self._body()
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.state.requests.append(f"{self.command} {split.path}")
        try:
            self._route(split.path, query, body)
        except _Failure as failure:
            self._json(failure.status, {"error": {"code": failure.status, "message": failure.message}})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped reading (a listing it needed one entry of)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = lambda self: self._dispatch()

    # --- the API --------------------------------------------------------------------------------------------------
    def _route(self, path: str, query: dict, body: bytes):
        method = self.command
        match = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
        if match and method in ("POST", "PUT"):
            return self._upload(match[1], query, body)
        match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/(moveTo|rewriteTo|copyTo)/(?:b/([^/]+)/)?o/(.+)", path)
        if match and method == "POST":
            return self._copy(unquote(match[1]), unquote(match[2]), unquote(match[4] or match[1]),
                              unquote(match[5]), move=match[3] == "moveTo", query=query)
        match = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", path)
        if match:
            bucket, name = unquote(match[1]), unquote(match[2])
            if method in ("GET", "HEAD"):
                return self._get(bucket, name, query)
            if method == "DELETE":
                return self._delete(bucket, name, query)
        match = re.fullmatch(r"/storage/v1/b/([^/]+)/o", path)
        if match and method == "GET":
            return self._list(unquote(match[1]), query)
        match = re.fullmatch(r"/storage/v1/b/([^/]+)", path)
        if match and method == "GET":
            self._bucket(unquote(match[1]))
            return self._json(200, {"kind": "storage#bucket", "name": unquote(match[1]), "id": unquote(match[1])})
        raise _Failure(501, f"not emulated: {method} {path}")

    def _bucket(self, name: str) -> _Bucket:
        if name not in self.state.buckets:
            raise _Failure(404, f"no bucket {name}")
        return self.state.buckets[name]

    @staticmethod
    def _check_preconditions(current: tuple | None, query: dict):
        generation = current[1] if current else 0
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            raise _Failure(412, f"generation {generation} does not match {query['ifGenerationMatch']}")
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
            raise _Failure(304, "not modified")

    def _store(self, bucket: str, name: str, data: bytes, content_type: str, query: dict) -> dict:
        with self.state.lock:
            objects = self._bucket(bucket).objects
            self._check_preconditions(objects.get(name), query)
            generation = self.state.next_generation()
            objects[name] = (data, generation, content_type)
        return resource(bucket, name, data, generation, content_type)

    def _get(self, bucket: str, name: str, query: dict):
        with self.state.lock:
            current = self._bucket(bucket).objects.get(name)
            if current is None:
                raise _Failure(404, f"no object {bucket}/{name}")
            try:
                self._check_preconditions(current, query)
            except _Failure as failure:
                if failure.status == 304:
                    return self._send(304, headers={"x-goog-generation": str(current[1])})
                raise
        data, generation, content_type = current
        headers = {"x-goog-generation": str(generation), "x-goog-metageneration": "1",
                   "x-goog-stored-content-length": str(len(data))}
        if query.get("alt") != "media":
            return self._json(200, resource(bucket, name, data, generation, content_type), headers)
        requested = self.headers.get("Range")
        if not requested:
            return self._send(200, data, headers, content_type)
        first, last = re.fullmatch(r"bytes=(\d*)-(\d*)", requested.strip()).groups()
        if first == "":  # the last `last` bytes
            start, stop = max(0, len(data) - int(last)), len(data)
        else:
            start, stop = int(first), min(len(data), int(last) + 1 if last else len(data))
        if start >= len(data) and len(data) > 0 or start > stop:
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers})
        headers["Content-Range"] = f"bytes {start}-{max(start, stop - 1)}/{len(data)}"
        return self._send(206, data[start:stop], headers, content_type)

    def _delete(self, bucket: str, name: str, query: dict):
        with self.state.lock:
            objects = self._bucket(bucket).objects
            if name not in objects:
                raise _Failure(404, f"no object {bucket}/{name}")
            self._check_preconditions(objects[name], query)
            del objects[name]
        self._send(204)

    def _list(self, bucket: str, query: dict):
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start_after = query.get("pageToken", "")
        limit = int(query.get("maxResults") or 1000)
        with self.state.lock:
            names = sorted(n for n in self._bucket(bucket).objects if n.startswith(prefix) and n > start_after)
            entries: list[tuple[str, bool]] = []  # (name or prefix, is a prefix)
            for name in names:
                rest = name[len(prefix):]
                if delimiter and delimiter in rest:
                    folder = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                    if not entries or entries[-1] != (folder, True):
                        entries.append((folder, True))
                else:
                    entries.append((name, False))
            page, more = entries[:limit], len(entries) > limit
            objects = self._bucket(bucket).objects
            items = [resource(bucket, n, *objects[n]) for n, is_prefix in page if not is_prefix]
        payload = {"kind": "storage#objects", "items": items,
                   "prefixes": [n for n, is_prefix in page if is_prefix]}
        if more:
            last, is_prefix = page[-1]
            # Past a prefix, skip every object under it.
            payload["nextPageToken"] = last + "\U0010ffff" if is_prefix else last
        self._json(200, payload)

    def _copy(self, bucket: str, name: str, to_bucket: str, to_name: str, move: bool, query: dict):
        with self.state.lock:
            source = self._bucket(bucket).objects.get(name)
            if source is None:
                raise _Failure(404, f"no object {bucket}/{name}")
            targets = self._bucket(to_bucket).objects
            self._check_preconditions(targets.get(to_name), query)
            generation = self.state.next_generation()
            targets[to_name] = (source[0], generation, source[2])
            if move:
                del self._bucket(bucket).objects[name]
        copied = resource(to_bucket, to_name, source[0], generation, source[2])
        if "rewriteTo" in self.path:
            size = str(len(source[0]))
            return self._json(200, {"kind": "storage#rewriteResponse", "totalBytesRewritten": size,
                                    "objectSize": size, "done": True, "resource": copied})
        self._json(200, copied)

    def _upload(self, bucket: str, query: dict, body: bytes):
        kind = query.get("uploadType", "media")
        if "upload_id" in query:
            return self._upload_chunk(query["upload_id"], body)
        if kind == "media":
            name = query.get("name") or ""
            stored = self._store(bucket, name, body, self.headers.get("Content-Type") or "application/octet-stream",
                                 query)
            return self._json(200, stored)
        if kind == "multipart":
            metadata, data, content_type = _multipart(self.headers.get("Content-Type", ""), body)
            name = query.get("name") or metadata.get("name", "")
            stored = self._store(bucket, name, data, metadata.get("contentType") or content_type, query)
            return self._json(200, stored)
        if kind == "resumable":
            metadata = json.loads(body or b"{}")
            upload_id = uuid.uuid4().hex
            self.state.uploads[upload_id] = {
                "bucket": bucket, "name": query.get("name") or metadata.get("name", ""), "data": bytearray(),
                "query": query, "content_type": metadata.get("contentType") or "application/octet-stream"}
            location = (f"{self.state.url}/upload/storage/v1/b/{quote(bucket, safe='')}/o?uploadType=resumable"
                        f"&upload_id={upload_id}")
            return self._send(200, b"", {"Location": location})
        raise _Failure(501, f"not emulated: uploadType={kind}")

    def _upload_chunk(self, upload_id: str, body: bytes):
        upload = self.state.uploads.get(upload_id)
        if upload is None:
            raise _Failure(404, f"no upload session {upload_id}")
        upload["data"] += body
        content_range = self.headers.get("Content-Range", "")
        total = content_range.rsplit("/", 1)[-1] if "/" in content_range else str(len(upload["data"]))
        if total == "*":
            headers = {"Range": f"bytes=0-{len(upload['data']) - 1}"} if upload["data"] else {}
            return self._send(308, b"", headers)
        del self.state.uploads[upload_id]
        stored = self._store(upload["bucket"], upload["name"], bytes(upload["data"]), upload["content_type"],
                             upload["query"])
        self._json(200, stored)


def _multipart(content_type: str, body: bytes) -> tuple[dict, bytes, str]:
    """The metadata, the data and the data's content type of a ``multipart/related`` upload."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)[1].encode()
    parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
    decoded = []
    for part in parts:
        head, _, data = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        match = re.search(rb"content-type:\s*([^\r\n]+)", head, re.IGNORECASE)
        decoded.append((match[1].decode() if match else "application/octet-stream", data.removesuffix(b"\r\n")))
    return json.loads(decoded[0][1] or b"{}"), decoded[1][1], decoded[1][0]


@contextlib.contextmanager
def serving(monkeypatch, buckets=("bucket",)):
    """Serve an emulator and point this process's clients at it (environment and gcsfs's cached instances)."""
    with GCSEmulator(buckets) as emulator:
        for key, value in emulator.environment().items():
            monkeypatch.setenv(key, value)
        try:
            import gcsfs

            gcsfs.GCSFileSystem.clear_instance_cache()
        except ImportError:
            pass
        yield emulator
