"""The live run dashboard (assets/dashboard.html, which serve_dashboard.sh installs in the outputs root), in a real
browser, and serve_dashboard.sh itself (bad ports, a port in use, no run yet).

A local http.server serves a temp outputs folder and records every request; the test plays the run (harness.Run
writing status.json, metrics.json and PNGs) while headless chromium shows the page. Chromium is driven over the
DevTools protocol on --remote-debugging-pipe: commands go in on the browser's fd 3 and answers come out on its fd 4,
each a JSON message ending in a NUL byte, so no websocket library is needed.

Chromium: found on PATH, else installed with apt-get (Debian's `chromium`) when we are root; when that is not
possible the browser tests are skipped and say why.
"""
import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest

fcntl = pytest.importorskip("fcntl")  # the pipe set-up below is POSIX-only

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "assets", "dashboard.html")
INTERVAL_MS = 200  # the page's poll interval in these tests (?interval=)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def png(width, height, rgb):
    """A solid-colour RGB PNG, written by hand (signature, IHDR, one zlib IDAT, IEND)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))  # filter byte 0, then the pixels
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_figure(run, name, rgb=(200, 60, 60)):
    """A figure appears whole, as savefig's would (temp name without .png, then rename)."""
    with open(run.path(name + ".part"), "wb") as f:
        f.write(png(200, 150, rgb))
    os.replace(run.path(name + ".part"), run.path(name))


def make_run(out, run_id, script="fake_script"):
    return harness.Run(script, argparse.Namespace(out=str(out), run_id=run_id, quick=False))


def say(request, line):
    """A line on the terminal even under -q and output capture (installing chromium takes a while)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(f"test_dashboard: {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(f"test_dashboard: {line}")


def install(out):
    """What serve_dashboard.sh does before it serves `out`."""
    os.makedirs(out, exist_ok=True)
    shutil.copy(ASSET, os.path.join(out, "dashboard.html"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- no browser needed
def test_run_names_the_newest_run_and_leaves_the_page_to_the_server(tmp_path):
    make_run(tmp_path, "first")
    assert (tmp_path / "LATEST_RUN.txt").read_text() == "fake_script/first\n"
    make_run(tmp_path, "second")
    assert (tmp_path / "LATEST_RUN.txt").read_text() == "fake_script/second\n"
    assert os.readlink(tmp_path / "current") == os.path.join("fake_script", "second")  # relative: the folder can move
    assert sorted(os.listdir(tmp_path)) == ["LATEST_RUN.txt", "current", "fake_script"]  # no page, no temps


def test_dashboard_is_self_contained():
    html = open(ASSET, encoding="utf-8").read()
    assert not re.search(r"""\b(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I), "a remote src/href"
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I), "an external script"
    assert not re.search(r"@import|@font-face|url\s*\(", html, re.I), "an external style or font"
    assert not re.search(r"""fetch\(\s*["'`]\s*(https?:)?//""", html), "a remote fetch"
    for link in re.findall(r"<link[^>]*>", html, re.I):
        assert re.search(r"""href=["']data:""", link), link
    for ident in ("state", "progress-text", "figures", "metrics", "lightbox", "lightbox-img", "zoom-in", "zoom-out",
                  "zoom-reset", "lightbox-close"):
        assert f'id="{ident}"' in html


SERVE = os.path.join(ROOT, "serve_dashboard.sh")


def serve(out, *args, **kw):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", SERVE, *args], env=env, capture_output=True, text=True, timeout=30, **kw)


@pytest.mark.parametrize("port", ["0", "99999", "65536", "-1", "abc", "80x", "1e3", "8000 1"])
def test_serve_dashboard_rejects_a_port_out_of_range(tmp_path, port):
    r = serve(tmp_path / "out", port)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr == f"serve_dashboard.sh: error: PORT must be a number from 1 to 65535, got '{port}'\n"
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_serve_dashboard_refuses_a_port_in_use_and_an_unusable_out(tmp_path):
    with socket.socket() as other:  # another server already listens on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = serve(tmp_path / "out", str(port))
    assert r.returncode == 2 and r.stdout == "", r  # no address that would point at the other server
    assert r.stderr.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in r.stderr, r.stderr
    (tmp_path / "a_file").write_text("not a folder")
    r = serve(tmp_path / "a_file", str(free_port()))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "OUT=" in r.stderr, r.stderr


def test_serve_dashboard_installs_the_page_and_needs_no_run(tmp_path):
    out = tmp_path / "outputs"  # not there yet: no run has written to it
    port = free_port()
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    p = subprocess.Popen(["bash", SERVE, str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == f"http://localhost:{port}/dashboard.html"
        # the address is printed once the server listens: the first request is answered, no retry needed
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard.html", timeout=10) as resp:
            assert resp.read() == open(ASSET, "rb").read()
        with pytest.raises(urllib.error.HTTPError) as e:  # no run yet: the page shows "No run yet" until it appears
            urllib.request.urlopen(f"http://127.0.0.1:{port}/LATEST_RUN.txt", timeout=10)
        assert e.value.code == 404
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    assert sorted(os.listdir(out)) == ["dashboard.html"]  # installed whole: no temp file left
    (out / "dashboard.html").write_text("an old version")  # a changed template is copied again at the next start
    p = subprocess.Popen(["bash", SERVE, str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == f"http://localhost:{port}/dashboard.html"
        assert open(out / "dashboard.html", "rb").read() == open(ASSET, "rb").read()
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


# ----------------------------------------------------------------------------- chromium over the DevTools pipe
def find_chromium():
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    return None


def install_chromium(request):
    """apt-get install Debian's chromium (apt-get update first only if that fails). Returns why it did not work."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not on PATH, and not root, so it cannot be installed with apt-get"
    if not shutil.which("apt-get"):
        return "not on PATH, and no apt-get to install it with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    say(request, "chromium not found: installing it with apt-get (this takes a few minutes, once)")
    t0 = time.monotonic()
    try:
        r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            say(request, "apt-get install failed: running apt-get update, then trying again")
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=180)
            r = subprocess.run(install, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        return f"apt-get timed out after {e.timeout} s"
    if r.returncode != 0:
        return f"apt-get install chromium failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    say(request, f"installed chromium in {time.monotonic() - t0:.0f} s")
    return "installed, but no chromium on PATH afterwards"


@pytest.fixture(scope="module")
def chromium(request):
    path = find_chromium()
    if path is None:
        why = install_chromium(request)
        path = find_chromium()
        if path is None:
            say(request, f"chromium not available ({why}): browser test skipped")
            pytest.skip(f"chromium not available ({why}): browser test skipped")
    return path


class Browser:
    """Headless chromium speaking the DevTools protocol over a pair of pipes (its fd 3 in, its fd 4 out)."""

    def __init__(self, exe, workdir):
        to_r, self.to_w = os.pipe()  # commands: we write, chromium reads on fd 3
        self.from_r, from_w = os.pipe()  # answers: chromium writes on fd 4, we read
        # the child's ends go above fd 9, so the trampoline's dup2 onto 3 and 4 cannot overwrite one of them
        child_in, child_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_r, from_w))
        os.close(to_r)
        os.close(from_w)
        trampoline = ("import os, sys; a, b = int(sys.argv[1]), int(sys.argv[2]); os.dup2(a, 3); os.dup2(b, 4); "
                      "os.close(a); os.close(b); os.execv(sys.argv[3], sys.argv[3:])")
        self.log_path = os.path.join(workdir, "chromium.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-c", trampoline, str(child_in), str(child_out), exe,
                 "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--mute-audio", "--window-size=1280,900",
                 "--remote-debugging-pipe", f"--user-data-dir={os.path.join(workdir, 'profile')}", "about:blank"],
                pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # its own process group: teardown kills the browser and all its helpers
        os.close(child_in)
        os.close(child_out)
        self.answers, self.next_id, self.closed = {}, 0, False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            try:
                data = os.read(self.from_r, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *messages, buf = buf.split(b"\0")
            for m in messages:
                msg = json.loads(m)
                if "id" in msg:  # events (no id) are not needed here
                    with self.cond:
                        self.answers[msg["id"]] = msg
                        self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def log_tail(self):
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-15:])

    def send(self, method, params=None, session=None, timeout=20):
        with self.cond:
            self.next_id += 1
            mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")  # small: one write on a pipe
        with self.cond:
            self.cond.wait_for(lambda: mid in self.answers or self.closed, timeout)
            answer = self.answers.pop(mid, None)
        if answer is None:
            raise AssertionError(f"chromium did not answer {method} within {timeout} s; its log:\n{self.log_tail()}")
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def close(self):
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=3)
        with contextlib.suppress(Exception):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        for fd in (self.to_w, self.from_r):
            with contextlib.suppress(Exception):
                os.close(fd)


class Page:
    """One tab, attached in flat mode: every command carries its sessionId."""

    def __init__(self, browser):
        self.browser = browser
        self.target = browser.send("Target.createTarget", {"url": "about:blank"}, timeout=60)["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": self.target, "flatten": True})["sessionId"]

    def send(self, method, params=None, timeout=20):
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def goto(self, url):
        self.send("Page.navigate", {"url": url})

    def js(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression, what, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):  # e.g. the new document is not there yet
                if self.js(expression):
                    return
            if time.monotonic() > deadline:
                seen = self.js("JSON.stringify({state: document.getElementById('state')?.textContent, "
                               "progress: document.getElementById('progress-text')?.textContent, "
                               "notice: document.getElementById('notice')?.textContent, "
                               "figures: document.querySelectorAll('.figure img').length, url: location.href})")
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; the page shows {seen}")
            time.sleep(0.05)

    def rect(self, selector):
        """The element's box in the viewport, scrolled into view first (a mouse event only reaches what is seen)."""
        return self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                       " e.scrollIntoView({block: 'center', inline: 'center'}); const r = e.getBoundingClientRect();"
                       " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")

    def mouse(self, selector, kind="click", delta_y=0):
        """A real mouse click (or wheel turn) at the middle of the element, through the browser's input pipeline."""
        r = self.rect(selector)
        x, y = r["x"] + r["width"] / 2, r["y"] + r["height"] / 2
        if kind == "wheel":
            self.send("Input.dispatchMouseEvent",
                      {"type": "mouseWheel", "x": x, "y": y, "deltaX": 0, "deltaY": delta_y})
            return
        for t in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": t, "x": x, "y": y, "button": "left", "clickCount": 1})

    def key(self, key, code):
        for t in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", {"type": t, "key": key, "code": code})

    def close(self):
        with contextlib.suppress(Exception):
            self.browser.send("Target.closeTarget", {"targetId": self.target}, timeout=5)


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory, request):
    t0 = time.monotonic()
    b = Browser(chromium, str(tmp_path_factory.mktemp("chromium")))
    try:
        version = b.send("Browser.getVersion", timeout=60)["product"]
        say(request, f"{version} started in {time.monotonic() - t0:.1f} s ({chromium})")
        yield b
    finally:
        b.close()


@pytest.fixture
def page(browser):
    p = Page(browser)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """http.server on a free port for a temp folder; server.requests holds (monotonic time, path) of every GET."""
    root = tmp_path_factory.mktemp("served")

    class Recorder(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            self.server.requests.append((time.monotonic(), self.path))
            super().do_GET()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Recorder, directory=str(root)))
    srv.daemon_threads = True
    srv.root, srv.requests = root, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def requests_under(server, prefix):
    return [(t, p) for t, p in list(server.requests) if p.startswith(prefix)]


def eventually(predicate, what, timeout=15):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


FIGURES = "document.querySelectorAll('.figure img')"
LOADED = f"[...{FIGURES}].every((i) => i.complete && i.naturalWidth > 0)"


def test_dashboard_follows_a_run_and_stops_polling_when_it_completes(server, page):
    out = server.root / "follow"  # this test's outputs root, served under /follow/
    install(out)  # as serve_dashboard.sh does
    run = make_run(out, "demo-run")  # the real code path: LATEST_RUN.txt names the run
    write_figure(run, "loss.png")
    run.log(train_loss=0.5, eval={"fid": 3.25, "n": 100}, sweep=[{"w": 0.0, "fid": 9.5}, {"w": 1.0, "fid": 4.5}],
            wide=[{f"column_{i}": i * 1.5 for i in range(40)}])  # a table wider than the window
    run.progress("train", 40, 100, force=True)

    page.goto(f"{server.url}/follow/dashboard.html?interval={INTERVAL_MS}")
    page.wait_for("document.getElementById('progress-text').textContent === '40.0%' && "
                  f"{FIGURES}.length === 1 && {LOADED}", "40% and one loaded figure")
    assert page.js("document.getElementById('state').textContent") == "running"
    assert page.js("document.getElementById('title').textContent") == "fake_script / demo-run"
    assert page.js("document.getElementById('step-text').textContent") == "step 40 / 100"
    metrics = page.js("document.getElementById('metrics').textContent")
    assert "train_loss" in metrics and "eval.fid" in metrics and "3.25" in metrics and "9.5" in metrics
    value_right = page.js("(() => { const th = [...document.querySelectorAll('#metrics-table th')]"
                          ".find((t) => t.textContent === 'train_loss'); const r = document.createRange();"
                          " r.selectNodeContents(th.nextElementSibling); return r.getBoundingClientRect().right; })()")
    assert 0 < value_right < page.js("window.innerWidth")  # the number is on screen, not pushed out by a wide table

    write_figure(run, "samples.png", rgb=(40, 90, 200))  # the run draws a new figure, then reports progress
    run.progress("sample", 70, 100, force=True)
    page.wait_for(f"{FIGURES}.length === 2 && {LOADED} && "
                  "document.getElementById('progress-text').textContent === '70.0%'", "70% and two loaded figures")
    assert page.js(f"[...{FIGURES}].map((i) => i.alt).join()") == "loss.png,samples.png"
    assert page.js("document.getElementById('phase').textContent") == "phase: sample"
    polls = [p for _, p in requests_under(server, "/follow/fake_script/demo-run/status.json")]
    assert len(polls) >= 2, polls  # it polled while running

    run.finish()
    page.wait_for("document.getElementById('state').textContent === 'completed' && "
                  f"document.body.dataset.polling === 'stopped' && {LOADED}", "the completed state")
    seen_done = time.monotonic()
    assert page.js("document.getElementById('progress-text').textContent") == "100.0%"
    assert "wall_time_s" in page.js("document.getElementById('metrics').textContent")
    before = len(requests_under(server, "/follow/"))
    time.sleep(6 * INTERVAL_MS / 1000)  # six poll intervals: a page still polling would have asked 6 times
    after = requests_under(server, "/follow/")
    assert len(after) == before, f"requests after completion: {after[before:]}"
    late = [p for t, p in after if t > seen_done and not p.split("?")[0].endswith(".png")]
    assert not late, f"the page asked for {late} after it showed completion"


def test_dashboard_zooms_into_a_figure_and_shows_no_run_yet(server, page):
    out = server.root / "zoom"
    install(out)
    page.goto(f"{server.url}/zoom/dashboard.html?interval={INTERVAL_MS}")
    page.wait_for("document.getElementById('notice').textContent.includes('No run yet')", "the no-run-yet notice")
    n = len(requests_under(server, "/zoom/LATEST_RUN.txt"))
    eventually(lambda: len(requests_under(server, "/zoom/LATEST_RUN.txt")) >= n + 2, "more polls of LATEST_RUN.txt")
    page.goto("about:blank")

    run = make_run(out, "zoomed")
    write_figure(run, "grid.png")
    run.finish(state="failed", message="loss is NaN at step 12")
    pinned = f"{server.url}/zoom/dashboard.html?interval={INTERVAL_MS}&run=fake_script/zoomed"
    os.remove(out / "LATEST_RUN.txt")  # ?run= pins the run: LATEST_RUN.txt is not needed
    page.goto(pinned)
    page.wait_for(f"document.getElementById('state').textContent === 'failed' && {FIGURES}.length === 1 && {LOADED}",
                  "the failed run with its figure")
    assert page.js("document.getElementById('message').textContent") == "loss is NaN at step 12"

    width = "document.getElementById('lightbox-img').getBoundingClientRect().width"
    page.mouse(".figure img")  # a real click on the figure opens the lightbox
    page.wait_for("!document.getElementById('lightbox').hidden && "
                  "document.getElementById('zoom-level').textContent === '100%'", "the lightbox, fitted")
    w0 = page.js(width)
    assert w0 == pytest.approx(200, abs=1)  # fits the window at its own size
    page.mouse("#zoom-in")
    page.wait_for(f"{width} > {w0} * 1.1", "zoom in (+) to enlarge the image")
    page.mouse("#zoom-out")
    page.mouse("#zoom-out")
    page.wait_for(f"{width} < {w0} * 0.9", "zoom out (-) to shrink the image")
    page.mouse("#zoom-reset")
    page.wait_for(f"Math.abs({width} - {w0}) < 1", "reset to restore the fitted size")
    page.mouse("#lightbox-img", kind="wheel", delta_y=-120)  # wheel up zooms in
    page.wait_for(f"{width} > {w0} * 1.05", "the wheel zoom")
    page.key("Escape", "Escape")
    page.wait_for("document.getElementById('lightbox').hidden", "Escape to close the lightbox")
