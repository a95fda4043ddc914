"""A small Chrome DevTools Protocol (CDP) driver for tests: headless Chromium over a pipe.

No Selenium, no Playwright, no websocket: Chromium is started with
``--remote-debugging-pipe`` and reads CDP commands on its fd 3 and writes answers and
events on its fd 4, JSON messages each ended by a NUL byte. One reader thread files every
message it receives: answers by command id, events in one log that waiters scan from a
mark taken *before* the action that causes them (so that no event is ever missed).

Everything is bounded: every command and every wait has a deadline and raises
BrowserError past it (never hangs), and ``Browser.close`` always ends the whole process
group of the browser (renderers, zygotes), even when the browser no longer answers. Should
the test process itself be killed, Chromium sees its pipe close and quits by itself.

    with Browser.start() as browser, browser.new_tab() as tab:
        tab.set_headers({"Authorization": "Basic ..."})
        tab.navigate("http://127.0.0.1:8080/stats")
        tab.wait_for("document.querySelector('td.st-up') !== null")

Each tab lives in its own browser context (an incognito-like profile): no cookie, cache or
credential is shared between tabs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

COMMAND_TIMEOUT = 10.0  # one CDP command (the machine may be busy with other tests)
LOAD_TIMEOUT = 15.0  # one page load
START_TIMEOUT = 30.0  # the browser's first answer
POLL_INTERVAL = 0.05  # DOM polling: short, the deadline bounds it

FLAGS = (
    "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-dev-shm-usage", "--mute-audio",
    "--password-store=basic", "--use-mock-keychain", "--metrics-recording-only",
)

# Chromium wants the pipe on fds 3 and 4; pass_fds keeps fds under their own numbers, so a
# tiny exec-launcher moves them (a preexec_fn is unsafe here: the test process has threads).
_LAUNCHER = """\
import fcntl, os, sys
fds = [int(arg) for arg in sys.argv[1:3]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]
for fd in fds:
    os.close(fd)
for target, fd in zip((3, 4), high):
    os.dup2(fd, target)
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


class BrowserError(Exception):
    """The browser failed, died or did not answer in time."""


class CdpError(BrowserError):
    """A CDP command answered with an error, or evaluated code threw."""


@dataclass(frozen=True)
class Event:
    method: str
    params: dict[str, Any]
    session: str | None


def find_chromium() -> str | None:
    """$PYLB_CHROMIUM, else chromium or a Chrome on PATH."""
    if path := os.environ.get("PYLB_CHROMIUM"):
        return path
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


class Browser:
    """A headless Chromium process and its CDP pipe."""

    def __init__(self, proc: subprocess.Popen[bytes], send_fd: int, recv_fd: int,
                 workdir: Path) -> None:
        self.proc = proc
        self._send_fd = send_fd
        self._recv_fd = recv_fd
        self.workdir = workdir
        self._cond = threading.Condition()
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[Event] = []
        self._next_id = 0
        self._eof = False
        self._closed = False
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    # -- life --------------------------------------------------------------------------

    @classmethod
    def start(cls, executable: str | None = None, *, timeout: float = START_TIMEOUT,
              extra_flags: tuple[str, ...] = ()) -> Browser:
        """Start Chromium and wait for its first answer. BrowserError when it cannot."""
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError("no Chromium found: install chromium or set PYLB_CHROMIUM")
        if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
            raise BrowserError(f"{executable} is not an executable file")
        workdir = Path(tempfile.mkdtemp(prefix="pylb-chromium-"))
        cmd_r, cmd_w = os.pipe()  # we write commands, the browser reads them on fd 3
        ev_r, ev_w = os.pipe()  # the browser writes on fd 4, we read
        args = [executable, *FLAGS, *extra_flags, f"--user-data-dir={workdir / 'profile'}",
                "about:blank"]
        try:
            with open(workdir / "chromium.log", "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCHER, str(cmd_r), str(ev_w), *args],
                    pass_fds=(cmd_r, ev_w), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)  # killpg at close
        except OSError as error:
            os.close(cmd_w)
            os.close(ev_r)
            shutil.rmtree(workdir, ignore_errors=True)
            raise BrowserError(f"cannot run {executable}: {error}") from error
        finally:
            os.close(cmd_r)  # the browser's ends: ours would hide its exit (no EOF)
            os.close(ev_w)
        browser = cls(proc, cmd_w, ev_r, workdir)
        try:
            browser.call("Browser.getVersion", timeout=timeout)
        except BrowserError as error:
            browser.close()
            raise BrowserError(f"{executable} did not start: {error}") from None
        return browser

    def close(self) -> None:
        """Ask the browser to quit, then kill what is left of its process group. Once."""
        if self._closed:
            return  # its process group id may belong to someone else by now
        self._closed = True
        if self.proc.poll() is None and not self._eof:
            try:
                self.call("Browser.close", timeout=2.0)
            except BrowserError:
                pass
            try:
                self.proc.wait(3.0)
            except subprocess.TimeoutExpired:
                pass
        try:  # zygotes and renderers may outlive the main process: the whole group goes
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        for fd in (self._send_fd, self._recv_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._reader.join(2.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        """The end of the browser's own output, for error messages."""
        try:
            text = (self.workdir / "chromium.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- the pipe ----------------------------------------------------------------------

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = os.read(self._recv_fd, 1 << 16)
            except OSError:
                break
            if not data:
                break
            buffer += data
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue  # not CDP: nothing can wait for it
                self._file(message)
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _file(self, message: dict[str, Any]) -> None:
        with self._cond:
            if "id" in message:
                self._answers[message["id"]] = message
            else:
                self._events.append(Event(message.get("method", ""),
                                          message.get("params", {}),
                                          message.get("sessionId")))
            self._cond.notify_all()

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\0"
        with self._send_lock:
            try:
                while data:
                    data = data[os.write(self._send_fd, data):]
            except OSError as error:
                raise BrowserError(f"the browser's pipe is closed ({error})") from error

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """Send one command and wait for its answer's result."""
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._send(message)
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if self._eof:
                    raise BrowserError(f"{method}: the browser closed its pipe (exit status "
                                       f"{self.proc.poll()}); its output:\n{self.log_tail()}")
                if left <= 0:
                    raise BrowserError(f"{method}: no answer within {timeout}s")
                self._cond.wait(left)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error'].get('message')}"
                           f" ({answer['error'].get('data', '')})")
        result: dict[str, Any] = answer.get("result", {})
        return result

    # -- events ------------------------------------------------------------------------

    def mark(self) -> int:
        """The current end of the event log: wait for events after it."""
        with self._cond:
            return len(self._events)

    def events(self, method: str, *, session: str | None = None, since: int = 0) -> list[Event]:
        with self._cond:
            return [event for event in self._events[since:]
                    if event.method == method and (session is None or event.session == session)]

    def wait_event(self, method: str, *, session: str | None = None, since: int = 0,
                   where: Callable[[dict[str, Any]], bool] = lambda params: True,
                   timeout: float = LOAD_TIMEOUT) -> Event:
        """The first event `method` at or after index `since` whose params satisfy
        `where`; BrowserError past the deadline."""
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                for event in self._events[index:]:
                    if event.method == method and (session is None or event.session == session) \
                            and where(event.params):
                        return event
                index = len(self._events)
                left = deadline - time.monotonic()
                if self._eof:
                    raise BrowserError(f"waiting for {method}: the browser exited")
                if left <= 0:
                    raise BrowserError(f"no {method} event within {timeout}s")
                self._cond.wait(left)

    # -- tabs --------------------------------------------------------------------------

    def new_tab(self) -> Tab:
        """A blank page in a fresh browser context, attached, with Page and Network on."""
        context = self.call("Target.createBrowserContext")["browserContextId"]
        target = self.call("Target.createTarget", {"url": "about:blank",
                                                   "browserContextId": context})["targetId"]
        session = self.call("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, target, session, context)
        tab.call("Page.enable")
        tab.call("Page.setLifecycleEventsEnabled", enabled=True)
        tab.call("Network.enable")
        return tab


class Tab:
    """One page (a CDP target) and its session."""

    def __init__(self, browser: Browser, target: str, session: str, context: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session
        self.context = context

    def __enter__(self) -> Tab:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.browser.call("Target.closeTarget", {"targetId": self.target})
            self.browser.call("Target.disposeBrowserContext",
                              {"browserContextId": self.context})
        except BrowserError:
            pass  # the browser is gone or closing: Browser.close cleans up

    def call(self, method: str, timeout: float = COMMAND_TIMEOUT, **params: Any) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session, timeout=timeout)

    def mark(self) -> int:
        return self.browser.mark()

    def wait_event(self, method: str, *, since: int,
                   where: Callable[[dict[str, Any]], bool] = lambda params: True,
                   timeout: float = LOAD_TIMEOUT) -> Event:
        return self.browser.wait_event(method, session=self.session, since=since,
                                       where=where, timeout=timeout)

    def events(self, method: str, *, since: int = 0) -> list[Event]:
        return self.browser.events(method, session=self.session, since=since)

    # -- navigation --------------------------------------------------------------------

    def set_headers(self, headers: dict[str, str]) -> None:
        """Headers added to every request of this tab (e.g. Authorization)."""
        self.call("Network.setExtraHTTPHeaders", headers=headers)

    def navigate(self, url: str, *, allow_error: bool = False,
                 timeout: float = LOAD_TIMEOUT) -> str | None:
        """Load `url` and wait for that very document's load event. A failed navigation
        (e.g. net::ERR_INVALID_AUTH_CREDENTIALS, Chromium's answer to a 401 it has no
        credentials for) raises, unless `allow_error`: then its error text is returned,
        once the browser's error page has loaded."""
        since = self.mark()
        result = self.call("Page.navigate", url=url)
        error = result.get("errorText") or None
        if error and not allow_error:
            raise BrowserError(f"navigate {url}: {error}")
        self._wait_load(result.get("loaderId"), since, timeout)
        return error

    def wait_navigation(self, since: int, where: Callable[[str], bool],
                        timeout: float = LOAD_TIMEOUT) -> str:
        """After an action (a click, a form submit) taken after mark `since`: wait for the
        main frame to commit a document whose URL satisfies `where`, then for its load
        event; its URL."""
        event = self.wait_event(
            "Page.frameNavigated", since=since, timeout=timeout,
            where=lambda p: "parentId" not in p["frame"] and where(p["frame"]["url"]))
        frame = event.params["frame"]
        self._wait_load(frame["loaderId"], since, timeout)
        return str(frame["url"])

    def _wait_load(self, loader: str | None, since: int, timeout: float) -> None:
        self.wait_event("Page.lifecycleEvent", since=since, timeout=timeout,
                        where=lambda p: p.get("name") == "load" and p.get("loaderId") == loader)

    def document_response(self, since: int, timeout: float = LOAD_TIMEOUT,
                          where: Callable[[dict[str, Any]], bool] = lambda r: True
                          ) -> dict[str, Any]:
        """The first main-document response (Network.responseReceived's `response`: url,
        status, headers...) after `since` that satisfies `where`."""
        event = self.wait_event(
            "Network.responseReceived", since=since, timeout=timeout,
            where=lambda p: p.get("type") == "Document" and where(p["response"]))
        response: dict[str, Any] = event.params["response"]
        return response

    def sent_headers(self, since: int, method: str, url: str,
                     timeout: float = COMMAND_TIMEOUT) -> dict[str, str]:
        """The headers the network stack really sent (Origin, Authorization, Cookie... which
        requestWillBeSent does not show) with the first `method` request to `url` after
        mark `since`; names in lower case."""
        request = self.wait_event(
            "Network.requestWillBeSent", since=since, timeout=timeout,
            where=lambda p: p["request"]["method"] == method and p["request"]["url"] == url)
        ident = request.params["requestId"]
        # the first ExtraInfo of that id is the first hop's (a redirect reuses the id)
        extra = self.wait_event("Network.requestWillBeSentExtraInfo", since=since,
                                timeout=timeout, where=lambda p: p["requestId"] == ident)
        return {name.lower(): value for name, value in extra.params["headers"].items()}

    # -- the DOM -----------------------------------------------------------------------

    def evaluate(self, expression: str, timeout: float = COMMAND_TIMEOUT) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"{expression[:200]!r} threw: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = LOAD_TIMEOUT,
                 interval: float = POLL_INTERVAL) -> Any:
        """Poll `expression` until it is truthy; its value. Errors while a new document
        replaces the old one are retried. BrowserError past the deadline, with the last
        value or error and where the page is."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                value = self.evaluate(expression, timeout=max(0.5, deadline - time.monotonic()))
                if value:
                    return value
                last = value
            except CdpError as error:  # e.g. the execution context was destroyed
                last = error
            if time.monotonic() >= deadline:
                raise BrowserError(f"{expression[:200]!r} still {last!r} after {timeout}s "
                                   f"at {self.url()!r}")
            time.sleep(interval)

    def url(self) -> str:
        try:
            return str(self.evaluate("location.href", timeout=2.0))
        except BrowserError as error:
            return f"<unknown: {error}>"

    def text(self, selector: str = "body") -> str | None:
        """innerText of the first element matching `selector`, None when there is none."""
        value = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " return e === null ? null : e.innerText; })()")
        return None if value is None else str(value)

    def click(self, selector: str) -> None:
        """A real click() on the first element matching `selector` (must exist)."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (e === null) return false; e.click(); return true; })()")
        if not found:
            raise BrowserError(f"nothing matches {selector!r} at {self.url()!r}")
