"""A read-only OCI registry (distribution API v2, the GET/HEAD requests a
pull makes) on 127.0.0.1, serving images written by ociarchive.oci_layout:
enough for skopeo, with no registry package and no network."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Registry:
    """``images``: {(name, tag): {path: bytes} of an OCI layout}."""

    def __init__(self, images):
        self.blobs, self.tags, self.requests = {}, {}, []
        for (name, tag), files in images.items():
            for path, data in files.items():
                if path.startswith("blobs/sha256/"):
                    self.blobs["sha256:" + path.rsplit("/", 1)[1]] = data
            index = json.loads(files["index.json"])
            self.tags[(name, tag)] = index["manifests"][0]["digest"]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)

    @property
    def address(self):
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def lookup(self, path):
        """(body, content type, digest) for a v2 path, or None."""
        if path == "/v2/":
            return b"{}", "application/json", None
        head, sep, ref = path.rpartition("/manifests/")
        if sep:
            digest = self.tags.get((head[len("/v2/"):], ref), ref)
            if digest in self.blobs:
                return self.blobs[digest], MANIFEST, digest
            return None
        head, sep, digest = path.rpartition("/blobs/")
        if sep and digest in self.blobs:
            return (self.blobs[digest], "application/octet-stream", digest)
        return None

    def _handler(self):
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self, body=True):  # noqa: N802
                registry.requests.append((self.command, self.path))
                found = registry.lookup(self.path.split("?")[0])
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, ctype, digest = found
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Docker-Distribution-API-Version",
                                 "registry/2.0")
                if digest:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):  # noqa: N802
                self.do_GET(body=False)

            def log_message(self, *args):
                pass

        return Handler
