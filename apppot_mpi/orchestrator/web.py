"""The orchestrator's web page: status for admins, ready callback for nodes.

* ``GET /`` the status page (cycles, nodes and states, queue, decisions);
  ``GET /status.json`` the same as JSON.  Both need a login: ``POST
  /login`` with the admin token (a file in the state dir, mode 0600) sets
  an HttpOnly, SameSite=Strict session cookie; scripts may send
  ``Authorization: Bearer <token>`` instead.
* ``POST /x/ready`` (form fields ``node`` and ``token``): a node is up.
  Each node has its own token; it is never shown on any page.

Standard library only (http.server), one thread per connection, and
bounded: at most MAX_CONNECTIONS at once (MAX_PER_CLIENT per address), a
socket idle for IDLE_SECONDS or a request not done after REQUEST_SECONDS
is closed, bodies are read only for the known POST paths and only with a
valid Content-Length of at most MAX_FORM bytes, sessions end after
SESSION_SECONDS.
"""

import collections
import hmac
import html
import json
import logging
import re
import secrets
import socket
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("apppot.orchestrator")
COOKIE = "apppot_session"
MAX_FORM = 4096  # bytes of a POST body
POST_PATHS = ("/x/ready", "/login", "/logout")
MAX_CONNECTIONS = 64
MAX_PER_CLIENT = 8
IDLE_SECONDS = 10.0  # between two reads or writes of a connection
REQUEST_SECONDS = 30.0  # for a whole connection (slow drip senders)
SESSION_SECONDS = 8 * 3600.0
MAX_SESSIONS = 64

CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.2em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; }
.STARTING { background: #fff3c4; } .READY { background: #d8f5d0; }
.DRAINING { background: #ffe0b8; } .STOPPING { background: #f5d0d0; }
.DOWN { background: #e4e4e4; }
.summary span { display: inline-block; margin-right: 1.5em; }
small { color: #666; }
"""


def fmt_time(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "–"


def render_status(st):
    """The status page (pure: status dict → HTML; every value escaped)."""
    e = html.escape
    q = st.get("queue") or {}
    rows = []
    for n in st["nodes"] + list(reversed(st["history"])):
        ready = (f"{n['ready_at'] - n['created_at']:.1f} s"
                 if n.get("ready_at") else "–")
        rows.append(
            f"<tr class='{e(n['state'])}'><td>{e(n['nodeid'])}</td>"
            f"<td>{e(n['name'])}</td><td class='state'>{e(n['state'])}</td>"
            f"<td>{e(n['address'] or '–')}</td>"
            f"<td>{e(', '.join(n['jobs']) or '–')}</td>"
            f"<td>{n['idle_for']:.0f} s</td><td>{fmt_time(n['created_at'])}"
            f"</td><td>{ready}</td><td>{e(n['reason'] or '')}</td></tr>")
    rows = "".join(rows) or "<tr><td colspan='9'>no nodes</td></tr>"
    decisions = "".join(f"<li>{fmt_time(t)} {e(text)}</li>"
                        for t, text in reversed(st["decisions"]))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<title>apppot-orchestrator</title><link rel="stylesheet" href="/style.css">
</head><body>
<h1>apppot-orchestrator</h1>
<p class="summary"><span id="cycle">cycle {st['cycle']}</span>
<span>last cycle {fmt_time(st['last_cycle_at'])}
({st['last_cycle_seconds']:.2f} s)</span>
<span>nodes started {st['started']}, stopped {st['stopped']}</span></p>
<p><small>{e(st['batch'])} · {e(st['provider'])} · {e(st['policy'])} ·
max {st['max_nodes']} nodes, {st['max_delta']} per cycle</small></p>
<h2>Queue</h2>
<p class="summary" id="queue"><span>pending {q.get('pending', 0)}</span>
<span>candidates {q.get('candidates', 0)}</span>
<span>running {q.get('running', 0)}</span>
<span>idle nodes {q.get('idle', 0)}</span></p>
<h2>Nodes</h2>
<table id="nodes"><tr><th>id</th><th>name</th><th>state</th><th>address</th>
<th>jobs</th><th>idle</th><th>started</th><th>ready after</th><th>note</th>
</tr>
{rows}
</table>
<h2>Recent decisions</h2><ul id="decisions">{decisions}</ul>
<form method="post" action="/logout"><button>log out</button></form>
</body></html>
"""


LOGIN = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>apppot-orchestrator: log in
</title><link rel="stylesheet" href="/style.css"></head><body>
<h1>apppot-orchestrator</h1>{msg}
<form method="post" action="/login">
<label>admin token <input type="password" name="token" id="token"
 autocomplete="current-password"></label>
<button type="submit" id="login">log in</button></form>
<p><small>The token is in the orchestrator's state dir (web-token).</small></p>
</body></html>
"""


class Handler(BaseHTTPRequestHandler):
    server_version = "apppot-orchestrator"
    sys_version = ""
    def setup(self):
        self.timeout = self.server.idle_seconds  # of every read and write
        super().setup()
        # one deadline for the whole connection: a client that drips a
        # byte now and then never hits the idle timeout
        self._deadline = threading.Timer(self.server.request_seconds,
                                         self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self):
        self._deadline.cancel()
        try:
            super().finish()
        except OSError:
            pass  # the peer went away or the deadline closed the socket

    # --------------------------------------------------------- helpers
    def log_message(self, fmt, *args):  # no tokens: paths only, no bodies
        log.debug("web: %s %s", self.address_string(), fmt % args)

    def send(self, code, body, ctype="text/html; charset=utf-8", headers=()):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; style-src 'self'; "
                         "form-action 'self'; frame-ancestors 'none'")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def redirect(self, where, headers=()):
        self.send(HTTPStatus.SEE_OTHER, "", headers=(("Location", where),
                                                      *headers))

    def form(self):
        """The url-encoded body: ``(form, None)``, or ``(None, (status,
        text))`` without reading anything when its length is missing, not a
        plain decimal number, or over MAX_FORM."""
        if "Transfer-Encoding" in self.headers:
            return None, (HTTPStatus.LENGTH_REQUIRED, "no chunked bodies\n")
        values = self.headers.get_all("Content-Length") or []
        if len(values) != 1:
            return None, (HTTPStatus.LENGTH_REQUIRED,
                          "one Content-Length needed\n")
        if not re.fullmatch(r"[0-9]{1,10}", values[0].strip()):
            return None, (HTTPStatus.BAD_REQUEST, "bad Content-Length\n")
        n = int(values[0])
        if n > MAX_FORM:
            return None, (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too large\n")
        body = self.rfile.read(n)
        if len(body) != n:
            return None, (HTTPStatus.BAD_REQUEST, "body cut short\n")
        text = body.decode("utf-8", "replace")
        return {k: v[0] for k, v in urllib.parse.parse_qs(
            text, max_num_fields=16).items()}, None

    def authorized(self):
        web = self.server.web
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and web.check_token(auth[7:]):
            return True
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and web.check_session(value):
                return True
        return False

    # -------------------------------------------------------- routes
    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/style.css":
            return self.send(200, CSS, "text/css")
        if path == "/login":
            return self.send(200, LOGIN.format(msg=""))
        if path == "/x/ready":
            return self.send(HTTPStatus.METHOD_NOT_ALLOWED, "use POST\n",
                             "text/plain", (("Allow", "POST"),))
        if path not in ("/", "/status.json"):
            return self.send(404, "not found\n", "text/plain")
        if not self.authorized():
            if path == "/status.json":
                return self.send(401, "log in first\n", "text/plain")
            return self.redirect("/login")
        st = self.server.web.orch.status()
        if path == "/status.json":
            return self.send(200, json.dumps(st, indent=1),
                             "application/json")
        return self.send(200, render_status(st))

    do_HEAD = do_GET

    def do_POST(self):
        self.close_connection = True  # one request per connection
        path = urllib.parse.urlsplit(self.path).path
        if path not in POST_PATHS:  # no body read for anything else
            return self.send(404, "not found\n", "text/plain")
        try:
            form, refused = self.form()
        except ValueError:  # parse_qs: too many fields
            form, refused = None, (HTTPStatus.BAD_REQUEST, "bad form\n")
        if refused:
            return self.send(*refused, "text/plain")
        web = self.server.web
        if path == "/x/ready":
            ok = web.orch.node_ready(form.get("node", ""), form.get("token", ""))
            log.info("ready callback for %r from %s: %s", form.get("node"),
                     self.client_address[0], "accepted" if ok else "rejected")
            return self.send(200 if ok else 403,
                             "OK\n" if ok else "rejected\n", "text/plain")
        if path == "/login":
            if web.check_token(form.get("token", "")):
                sid = web.new_session()
                return self.redirect("/", ((
                    "Set-Cookie", f"{COOKIE}={sid}; HttpOnly; "
                    f"SameSite=Strict; Path=/; Max-Age={int(web.session_seconds)}"),))
            time.sleep(0.5)  # slow down guessing
            return self.send(403, LOGIN.format(
                msg="<p id='error'>Wrong token.</p>"))
        if path == "/logout":
            web.end_session(self.headers.get("Cookie", ""))
            return self.redirect("/login", ((
                "Set-Cookie", f"{COOKIE}=; Max-Age=0; Path=/"),))
        return self.send(404, "not found\n", "text/plain")


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections (in all and per
    client address) and one-line logs instead of tracebacks."""

    daemon_threads = True
    block_on_close = False  # closing must not wait for slow clients

    def __init__(self, address, web, max_connections=MAX_CONNECTIONS,
                 max_per_client=MAX_PER_CLIENT, idle_seconds=IDLE_SECONDS,
                 request_seconds=REQUEST_SECONDS):
        super().__init__(address, Handler)
        self.web = web
        self.max_connections, self.max_per_client = (max_connections,
                                                     max_per_client)
        self.idle_seconds, self.request_seconds = (idle_seconds,
                                                   request_seconds)
        self.open = collections.Counter()  # client address → connections
        self.open_lock = threading.Lock()

    def process_request(self, request, client_address):
        host = client_address[0]
        with self.open_lock:
            full = (sum(self.open.values()) >= self.max_connections or
                    self.open[host] >= self.max_per_client)
            if not full:
                self.open[host] += 1
        if full:
            log.debug("web: %s refused: too many connections", host)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.open_lock:
                self.open[client_address[0]] -= 1
                if self.open[client_address[0]] <= 0:
                    del self.open[client_address[0]]

    def handle_error(self, request, client_address):
        import sys  # noqa: PLC0415

        log.warning("web: request from %s failed: %s", client_address[0],
                    sys.exc_info()[1])


class WebServer:
    """The HTTP server in a thread; ``url`` once started."""

    def __init__(self, orch, host, port, admin_token, *,
                 session_seconds=SESSION_SECONDS, clock=time.monotonic,
                 **limits):
        if not admin_token:  # would let an empty token in
            raise ValueError("empty admin token")
        self.orch = orch
        self.admin_token = admin_token
        self.session_seconds = session_seconds
        self.clock = clock
        self.sessions = {}  # sid → expiry (self.clock)
        self.lock = threading.Lock()
        self.httpd = Server((host, port), self, **limits)
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{host}:{port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       name="web", daemon=True)

    def check_token(self, token):
        token = str(token)
        return bool(token) and hmac.compare_digest(
            self.admin_token.encode(), token.encode())

    def new_session(self):
        sid = secrets.token_urlsafe(32)
        with self.lock:
            self._expire_sessions()
            while len(self.sessions) >= MAX_SESSIONS:  # oldest goes
                del self.sessions[min(self.sessions,
                                      key=self.sessions.get)]
            self.sessions[sid] = self.clock() + self.session_seconds
        return sid

    def _expire_sessions(self):
        now = self.clock()
        for sid in [s for s, end in self.sessions.items() if end <= now]:
            del self.sessions[sid]

    def check_session(self, sid):
        with self.lock:
            self._expire_sessions()
            return bool(sid) and any(
                hmac.compare_digest(s.encode(), sid.encode())
                for s in self.sessions)

    def end_session(self, cookie_header):
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                with self.lock:
                    self.sessions.pop(value, None)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
