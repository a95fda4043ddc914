"""Fixtures: run real pylb processes and test backends on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import backends as tb
import psutil
import pytest
import yaml
from backends import BadBackend, EchoBackend, RawBackend, TcpBackend, workers_of

REPO = Path(__file__).resolve().parent.parent
READY_RE = r"generation \d+ ready"
READY_TIMEOUT = 15.0

class Pylb:
    """One pylb master process started with ``-f <config>`` in its own process group."""

    def __init__(self, workdir: Path, config: dict[str, Any] | str,
                 args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        if isinstance(config, str):
            text = config
            self.config: dict[str, Any] = yaml.safe_load(config) or {}
        else:
            text = yaml.safe_dump(config, sort_keys=False)
            self.config = config
        self.config_path = workdir / "pylb.yml"
        self.config_path.write_text(text)
        script = REPO / "bin" / "pylb"
        cmd = [sys.executable, str(script)] if script.exists() else [sys.executable, "-m", "lb"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*cmd, "-f", str(self.config_path), *args],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, regex: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """First output line at index >= ``start`` matching ``regex``; fails the test on
        timeout or if pylb exits first, showing what pylb printed."""
        pattern = re.compile(regex)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    if m := pattern.search(self.lines[index]):
                        return m
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.1))
        state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None \
            else "still running"
        pytest.fail(f"pylb ({state}) printed no line matching {regex!r} within {timeout}s;"
                    f" output:\n{self.output()}")

    def port(self, frontend: str) -> int:
        """Port of the frontend's first bind."""
        bind = self.config["frontends"][frontend]["bind"]
        if isinstance(bind, list):
            bind = bind[0]
        return int(str(bind).rsplit(":", 1)[1])

    def workers(self) -> list[psutil.Process]:
        """The worker processes (not the worker template)."""
        return workers_of(self.pid)

    def workers_rss(self) -> int:
        total = 0
        for w in self.workers():
            try:
                total += w.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the master; returns its exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        return self.proc.poll()

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(timeout=2)


PylbFactory = Callable[..., Pylb]


def refused(workdir: Path, config: dict[str, Any]) -> str:
    """What `pylb -c` says of a configuration it must refuse (written to lb.cfg)."""
    path = workdir / "lb.cfg"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([sys.executable, str(REPO / "bin" / "pylb"), "-c", "-f", str(path)],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode != 0, f"accepted: {config}"
    return done.stderr


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` -> a port on 127.0.0.1 nothing listens on."""
    return tb.free_port


def _pylb_factory(tmp_dir: Path) -> Iterator[PylbFactory]:
    started: list[Pylb] = []

    def start(config: dict[str, Any] | str, *args: str, wait_ready: bool = True) -> Pylb:
        workdir = tmp_dir / f"pylb{len(started)}"
        workdir.mkdir()
        lb = Pylb(workdir, config, args)
        started.append(lb)
        if wait_ready:
            lb.wait_log(READY_RE, READY_TIMEOUT)
        return lb

    try:
        yield start
    finally:
        for lb in started:
            lb.stop(timeout=5)
            tail = "\n".join(lb.lines[-40:])
            print(f"--- pylb {lb.pid} exit {lb.proc.returncode}, last output:\n{tail}")


@pytest.fixture
def pylb(tmp_path: Path) -> Iterator[PylbFactory]:
    """``pylb(config_dict_or_yaml_text, *extra_args)`` -> running Pylb (ready)."""
    yield from _pylb_factory(tmp_path)


@pytest.fixture(scope="module")
def pylb_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PylbFactory]:
    yield from _pylb_factory(tmp_path_factory.mktemp("pylb"))


class Backends:
    """Starts test servers and stops them all at teardown."""

    def __init__(self) -> None:
        self._all: list[Any] = []

    def _add(self, server: Any) -> Any:
        self._all.append(server)
        return server

    def echo(self, name: str = "echo", **options: Any) -> EchoBackend:
        return self._add(EchoBackend(name, **options))

    def raw(self) -> RawBackend:
        return self._add(RawBackend())

    def bad(self, mode: str) -> BadBackend:
        return self._add(BadBackend(mode))

    def tcp(self, mode: str, **options: Any) -> TcpBackend:
        return self._add(TcpBackend(mode, **options))

    def stop(self) -> None:
        for server in self._all:
            server.stop()


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def backends_module() -> Iterator[Backends]:
    b = Backends()
    yield b
    b.stop()


# corpus summary: test_corpus.py fills it, the terminal summary prints it
CORPUS_SUMMARY = pytest.StashKey[dict[str, dict[str, bool]]]()


@pytest.fixture(scope="session")
def corpus_summary(request: pytest.FixtureRequest) -> dict[str, dict[str, bool]]:
    return request.config.stash.setdefault(CORPUS_SUMMARY, {"accept": {}, "reject": {}})


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    summary = config.stash.get(CORPUS_SUMMARY, None)
    if not summary:
        return
    acc, rej = summary["accept"], summary["reject"]
    terminalreporter.write_sep("-", "llhttp corpus through pylb")
    terminalreporter.write_line(
        f"accepted forwarded {sum(acc.values())}/{len(acc)}, "
        f"rejected refused {sum(rej.values())}/{len(rej)}")
    for kind, results in summary.items():
        for title, ok in results.items():
            if not ok:
                terminalreporter.write_line(f"  {kind} case failed: {title}")
