"""The orchestrator's web page: status for admins, ready callback for nodes.

* ``GET /`` the status page (cycles, nodes and states, queue, decisions);
  ``GET /status.json`` the same as JSON.  Both need a login: ``POST
  /login`` with the admin token (a file in the state dir, mode 0600) sets
  an HttpOnly, SameSite=Strict session cookie; scripts may send
  ``Authorization: Bearer <token>`` instead.
* ``POST /x/ready`` (form fields ``node`` and ``token``): a node is up.
  Each node has its own token; it is never shown on any page.

Standard library only (http.server), one thread per request.
"""

import hmac
import html
import json
import logging
import secrets
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("apppot.orchestrator")
COOKIE = "apppot_session"
MAX_FORM = 4096

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
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_FORM:
            return None
        body = self.rfile.read(n).decode("utf-8", "replace")
        return {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}

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
        path = urllib.parse.urlsplit(self.path).path
        form = self.form()
        if form is None:
            return self.send(413, "too large\n", "text/plain")
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
                    "SameSite=Strict; Path=/"),))
            time.sleep(0.5)  # slow down guessing
            return self.send(403, LOGIN.format(
                msg="<p id='error'>Wrong token.</p>"))
        if path == "/logout":
            web.end_session(self.headers.get("Cookie", ""))
            return self.redirect("/login", ((
                "Set-Cookie", f"{COOKIE}=; Max-Age=0; Path=/"),))
        return self.send(404, "not found\n", "text/plain")


class WebServer:
    """The HTTP server in a thread; ``url`` once started."""

    def __init__(self, orch, host, port, admin_token):
        self.orch = orch
        self.admin_token = admin_token
        self.sessions = set()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.web = self
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{host}:{port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       name="web", daemon=True)

    def check_token(self, token):
        return hmac.compare_digest(self.admin_token.encode(),
                                   str(token).encode())

    def new_session(self):
        sid = secrets.token_urlsafe(32)
        with self.lock:
            self.sessions.add(sid)
        return sid

    def check_session(self, sid):
        with self.lock:
            return any(hmac.compare_digest(s.encode(), sid.encode())
                       for s in self.sessions)

    def end_session(self, cookie_header):
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                with self.lock:
                    self.sessions.discard(value)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
