"""Headless Chromium driven over the DevTools protocol on a pipe (no extra packages, no network port).

Used by the report tests to read the *rendered* DOM text of a page and to see whether any JavaScript
dialog (alert/confirm/prompt) opened. Needs Debian's `chromium` (apt-get install -y chromium).

    with Browser() as b:
        page = b.open("file:///.../index.html")      # {"text": innerText, "dialogs": [...]}
        b.evaluate("document.title")
"""
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

INSTALL = "apt-get update && apt-get install -y chromium"


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(f"headless Chromium is required for the report tests; install it: {INSTALL}")


class Browser:
    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s, self.next_id, self.events = timeout_s, 0, []
        self.profile = tempfile.mkdtemp(prefix="monosem-chromium-")
        to_child_r, self.to_child = os.pipe()       # chromium reads commands on fd 3
        self.from_child, from_child_w = os.pipe()   # and writes replies on fd 4

        def fds():  # in the child: move the pipe ends to fds 3 and 4 (via high fds: no clobbering)
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 20)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 20)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(3, 4, to_child_r, from_child_w), preexec_fn=fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self.buf = b""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_child], [], [], left)[0]:
                raise AssertionError("chromium did not answer in time")
            chunk = os.read(self.from_child, 1 << 16)
            if not chunk:
                raise AssertionError("chromium closed the DevTools pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def _handle_event(self, msg: dict) -> None:
        self.events.append(msg)
        if msg.get("method") == "Page.javascriptDialogOpening":  # record it, and close it
            self.send("Page.handleJavaScriptDialog", {"accept": True}, session=True)

    def send(self, method: str, params: dict | None = None, session: bool = False) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self.to_child, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        want, deadline = self.send(method, params, session), time.monotonic() + self.timeout_s
        while True:
            msg = self._read_message(deadline)
            if msg.get("id") == want:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._handle_event(msg)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            msg = self._read_message(deadline)
            if "method" in msg:
                self._handle_event(msg)

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                      session=True)
        return r["result"].get("value")

    def open(self, url: str) -> dict:
        """Load url; -> {"text": document.body.innerText, "dialogs": [messages of dialogs opened]}."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_event("Page.loadEventFired")
        text = self.evaluate("document.body.innerText")
        dialogs = [e["params"].get("message") for e in self.events
                   if e.get("method") == "Page.javascriptDialogOpening"]
        return {"text": text, "dialogs": dialogs}

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_child)
        os.close(self.from_child)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
