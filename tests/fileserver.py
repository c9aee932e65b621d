"""A tiny HTTP file server on 127.0.0.1 with Range support, for download tests (never the internet).

Besides serving files it can misbehave the ways real servers do, per path: cut a body short, send no
Content-Length, send a chunked body, answer a Range request with the whole file as a 206, send an HTML
page with status 200, or send bytes slowly.
"""

import http.server
import re
import threading
import time


class FileServer:
    """Serves ``files`` (path -> bytes). ``cut[path] = n`` sends only n bytes of a full response, then hangs up.

    Per-path misbehaviour: ``content_type[path]``; ``no_length`` (no Content-Length, body ends when the
    connection closes); ``chunked`` (Transfer-Encoding: chunked, a cut leaves the last chunk unfinished);
    ``range_from_zero`` (a Range request gets ``206`` with the body from byte 0); ``delay[path]`` seconds
    before each 64 KiB block; ``length[path]``: this Content-Length header instead of the true one (the body ends when
    the connection closes).
    """

    def __init__(self):
        self.files, self.cut, self.requests = {}, {}, []
        self.content_type, self.delay, self.length = {}, {}, {}
        self.no_length, self.chunked, self.range_from_zero = set(), set(), set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416, "Range Not Satisfiable")
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if self.path in server.range_from_zero:
                        start = 0
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", server.content_type.get(self.path, "application/octet-stream"))
                payload = body[start:]
                limit = server.cut.pop(self.path, None)
                if self.path in server.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                elif self.path in server.no_length:
                    self.send_header("Connection", "close")
                elif self.path in server.length:
                    self.send_header("Content-Length", server.length[self.path])
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if limit is not None:
                    payload = payload[:limit]
                if self.path in server.chunked:
                    self._send_chunked(payload, complete=limit is None)
                else:
                    for i in range(0, len(payload), 1 << 16):
                        time.sleep(server.delay.get(self.path, 0))
                        self.wfile.write(payload[i:i + (1 << 16)])
                if limit is not None or self.path in server.no_length or self.path in server.chunked \
                        or self.path in server.length:
                    self.close_connection = True

            def _send_chunked(self, payload, complete):
                block = 1 << 16
                for i in range(0, len(payload), block):
                    piece = payload[i:i + block]
                    # a cut body announces the full chunk but stops inside it, as a dropped connection does
                    size = block if not complete and i + block >= len(payload) else len(piece)
                    self.wfile.write(f"{size:x}\r\n".encode() + piece + (b"\r\n" if size == len(piece) else b""))
                if complete:
                    self.wfile.write(b"0\r\n\r\n")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
