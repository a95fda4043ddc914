"""Value syntaxes: durations, sizes, addresses and the small validators built on them.

The ``parse_*`` functions are plain: they take a Python value and return the parsed one or
raise ValueError with a complete message. The validators (``Parser``) take a located
:class:`Value` and raise ConfigError at its line.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import pwd
import re
from collections.abc import Callable
from typing import Any, TypeVar

from .model import Address
from .yamltree import Value

T = TypeVar("T")
Parser = Callable[[Value], Any]

DURATION_HINT = "a duration like 5s or 250ms"
SIZE_HINT = "a size like 16k or 1m"
COUNT_HINT = "a count like 1000 or 100k"
ADDRESS_HINT = "HOST:PORT like 127.0.0.1:8080, [::1]:8080 or *:8080"
LOG_HINT = "stderr, a file path, udp@HOST:PORT or unix@PATH"
MAX_DURATION = 365 * 86400.0

# unit -> (multiply, divide): exact for the common cases (250ms is 0.25, not 0.25000000001).
_UNITS = {
    "us": (1, 1_000_000),
    "ms": (1, 1000),
    "s": (1, 1),
    "m": (60, 1),
    "h": (3600, 1),
    "d": (86400, 1),
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(us|ms|s|m|h|d)?", re.ASCII)
_SIZE_RE = re.compile(r"(\d+)([kmg]?)", re.IGNORECASE | re.ASCII)
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_METHOD_RE = re.compile(r"[A-Z][A-Z0-9_-]*")
_COOKIE_VALUE_RE = re.compile(r"[!#-+\--:<-\[\]-~]+")  # RFC 6265 cookie-octet
_UNSAFE_RE = re.compile(r"[\x00-\x20\x7f]")


def show(x: object) -> str:
    """A Python value as an error message quotes it."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, str):
        return repr(x)
    return str(x)


# -- plain parsers --------------------------------------------------------------------------


def parse_duration(x: object) -> float:
    """Seconds from a number of seconds or a string with a unit: us, ms, s, m, h, d."""
    if isinstance(x, bool) or not isinstance(x, int | float | str):
        raise ValueError(f"expected {DURATION_HINT}, got {show(x)}")
    if isinstance(x, str):
        m = _DURATION_RE.fullmatch(x)
        if m is None:
            raise ValueError(f"expected {DURATION_HINT}, got {show(x)}")
        multiply, divide = _UNITS[m[2] or "s"]
        seconds = float(m[1]) * multiply / divide
    else:
        seconds = float(x)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected {DURATION_HINT}, got {show(x)}")
    if seconds > MAX_DURATION:
        raise ValueError(f"expected a duration of at most 365d, got {show(x)}")
    return seconds


def parse_size(x: object) -> int:
    """Bytes from an int or a string with a k, m or g suffix (powers of 1024)."""
    if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        return x
    m = _SIZE_RE.fullmatch(x) if isinstance(x, str) else None
    if m is None:
        raise ValueError(f"expected {SIZE_HINT}, got {show(x)}")
    return int(m[1]) * 1024 ** " kmg".index(m[2].lower() or " ")


def _split_address(text: object) -> tuple[str, int, bool]:
    """(host, port, bracketed) from HOST:PORT or [V6]:PORT."""
    if not isinstance(text, str) or ":" not in text or _UNSAFE_RE.search(text):
        raise ValueError(f"expected {ADDRESS_HINT}, got {show(text)}")
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected {ADDRESS_HINT}, got {show(text)}")
    else:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, like [::1]:8080, got {show(text)}")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid port {port!r} in {show(text)} (expected 1 to 65535)")
    if bracketed:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r} in {show(text)}") from None
    return host, int(port), bracketed


def _ipv4(host: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def parse_bind_address(text: object) -> Address:
    """A listening address: the host is an IP literal, ``localhost``, ``*`` or empty."""
    host, port, bracketed = _split_address(text)
    if not bracketed:
        if host in ("", "*"):
            host = "0.0.0.0"
        elif host.lower() == "localhost":
            host = "127.0.0.1"
        else:
            ip = _ipv4(host)
            if ip is None:
                raise ValueError(
                    f"bind host must be an IP address, localhost or *, got {host!r}"
                )
            host = ip
    return Address(host, port)


def parse_server_address(text: object) -> Address:
    """A server's address: the host may also be a host name (checked, not resolved)."""
    host, port, bracketed = _split_address(text)
    if not bracketed:
        if host in ("", "*"):
            raise ValueError(f"a server address needs a host, got {show(text)}")
        if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"invalid host name {host!r}")
        if host.rstrip(".").rpartition(".")[2].isdigit():  # no TLD is all digits: an IPv4
            ip = _ipv4(host)
            if ip is None:
                raise ValueError(f"invalid IPv4 address {host!r}")
            host = ip
    return Address(host, port)


# -- validators -----------------------------------------------------------------------------


class _Mismatch(ValueError):
    """Not what the key expects: the validator says "expected <what>, got <as written>"."""


def scalar(expected: str, convert: Callable[[Any], T], *, text: bool = False) -> Parser:
    """A validator for a scalar key. ``convert`` gets the YAML-typed value (or the text as
    written, with ``text=True``); it raises _Mismatch for "expected <expected>, got <value>",
    or ValueError with its own message."""

    def parse(v: Value) -> T:
        if not v.is_scalar:
            raise v.error(f"expected {expected}, got {v.describe()}")
        try:
            return convert(v.text if text else v.python)
        except _Mismatch:
            raise v.error(f"expected {expected}, got {v.describe()}") from None
        except ValueError as exc:
            raise v.error(str(exc)) from None

    return parse


def integer(low: int, high: int | None = None) -> Parser:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def convert(x: object) -> int:
        ok = isinstance(x, int) and not isinstance(x, bool)
        if not ok or x < low or (high is not None and x > high):
            raise _Mismatch()
        return x

    return scalar(expected, convert)


def _boolean(x: object) -> bool:
    if not isinstance(x, bool):
        raise _Mismatch()
    return x


boolean = scalar("true or false", _boolean)


def choice(*options: str) -> Parser:
    if len(options) == 2:
        expected = f"{options[0]} or {options[1]}"
    else:
        expected = "one of " + ", ".join(options)

    def convert(x: str | None) -> str:
        if x is None or x not in options:
            raise _Mismatch()
        return x

    return scalar(expected, convert, text=True)


def _positive_duration(x: object) -> float:
    seconds = parse_duration(x)
    if seconds <= 0:
        raise ValueError(f"expected a duration greater than 0, got {show(x)}")
    return seconds


duration = scalar(DURATION_HINT, _positive_duration)


def _positive_size(x: object) -> int:
    size = parse_size(x)
    if size <= 0:
        raise ValueError(f"expected a size greater than 0, got {show(x)}")
    return size


size = scalar(SIZE_HINT, _positive_size)


def _count(x: object) -> int:
    """A number of entries, with the same k, m, g suffixes as sizes (powers of 1024, as
    HAProxy's stick-table size: 100k is 102400)."""
    try:
        n = parse_size(x)
    except ValueError:
        raise _Mismatch() from None
    if n <= 0:
        raise ValueError(f"expected a count greater than 0, got {show(x)}")
    return n


count = scalar(COUNT_HINT, _count)
bind_address = scalar(ADDRESS_HINT, parse_bind_address, text=True)
server_address = scalar(ADDRESS_HINT, parse_server_address, text=True)


def matching(expected: str, pattern: re.Pattern[str]) -> Parser:
    """A text value that must fully match ``pattern``."""

    def convert(x: str | None) -> str:
        if x is None or not pattern.fullmatch(x):
            raise _Mismatch()
        return x

    return scalar(expected, convert, text=True)


def _path(x: str | None) -> str:
    if not x or "\x00" in x:
        raise _Mismatch()
    return x


path = scalar("a file path", _path, text=True)


def _socket_path(x: str | None) -> str:
    x = _path(x)
    if len(x.encode()) > 107:
        raise ValueError(f"a UNIX socket path is limited to 107 bytes, got {len(x.encode())}")
    return x


socket_path = scalar("a file path", _socket_path, text=True)
name = matching("a name made of letters, digits and - _ . :", NAME_RE)
token = matching("a name made of letters, digits and !#$%&'*+-.^_`|~", _TOKEN_RE)
cookie_value = matching("a cookie value (no spaces, quotes, commas, semicolons or \\)",
                        _COOKIE_VALUE_RE)
http_method = matching("an HTTP method like GET or HEAD", _METHOD_RE)


def _system_name(kind: str, by_name: Callable[[str], object],
                 by_number: Callable[[int], object]) -> Parser:
    """A user or group of this system, by name or number (HAProxy's `user`/`uid`,
    `group`/`gid`)."""

    def convert(x: str | None) -> str:
        if not x:
            raise _Mismatch()
        try:
            by_number(int(x)) if x.isdigit() else by_name(x)
        except KeyError:
            raise ValueError(f"no such {kind} on this system: {x!r}") from None
        return x

    return scalar(f"a {kind} name or number", convert, text=True)


system_user = _system_name("user", pwd.getpwnam, pwd.getpwuid)
system_group = _system_name("group", grp.getgrnam, grp.getgrgid)


def _directory(x: str | None) -> str:
    if not x or "\x00" in x:
        raise _Mismatch()
    if not os.path.isabs(x):
        raise ValueError(f"expected an absolute path, got {x!r}")
    if not os.path.isdir(x):
        raise ValueError(f"no such directory: {x!r}")
    return x


directory = scalar("a directory", _directory, text=True)


def _file_mode(x: str | None) -> int:
    """Permission bits, always read as octal: 660, "660", 0660 and "0o660" are all 0o660."""
    digits = (x or "").removeprefix("0o")
    if not digits or not all(c in "01234567" for c in digits) or int(digits, 8) > 0o777:
        raise _Mismatch()
    return int(digits, 8)


file_mode = scalar('an octal file mode like "660"', _file_mode, text=True)


def _expose_fd(x: str | None) -> bool:
    if x != "listeners":
        raise _Mismatch()
    return True


expose_fd = scalar("listeners", _expose_fd, text=True)


def _log_target(x: str | None) -> str:
    if not x or _UNSAFE_RE.search(x.replace(" ", "")):
        raise _Mismatch()
    if x.startswith("udp@"):
        try:
            parse_server_address(x[4:])
        except ValueError as exc:
            raise ValueError(f"bad udp@ log target: {exc}") from None
    elif x.startswith("unix@"):
        if not x[5:]:
            raise _Mismatch()
    elif re.match(r"[a-z0-9]+@", x):
        raise _Mismatch()
    return x


log_target = scalar(LOG_HINT, _log_target, text=True)


def _status_range(x: object) -> tuple[int, int]:
    if isinstance(x, int) and not isinstance(x, bool):
        low = high = x
    elif isinstance(x, str) and re.fullmatch(r"[0-9]{3}(-[0-9]{3})?", x):
        low, _, rest = x.partition("-")
        low, high = int(low), int(rest or low)
    else:
        raise _Mismatch()
    if not 100 <= low <= high <= 599:
        raise _Mismatch()
    return low, high


status_range = scalar("a status like 200 or a range like 200-399", _status_range)


def _uri_path(x: str | None) -> str:
    if x is None or not x.startswith("/") or _UNSAFE_RE.search(x):
        raise _Mismatch()
    return x


uri_path = scalar("a path starting with /", _uri_path, text=True)


def _plain_path(x: str | None) -> str:
    if x is None or not x.startswith("/") or _UNSAFE_RE.search(x) or "?" in x or "#" in x:
        raise _Mismatch()
    return x


plain_path = scalar("a path starting with /, without a query", _plain_path, text=True)


def _stats_uri(x: str | None) -> str:
    """A path, which may hold a query (HAProxy's habit: /haproxy?stats)."""
    if x is None or not x.startswith("/") or _UNSAFE_RE.search(x) or "#" in x:
        raise _Mismatch()
    return x


stats_uri = scalar("a path starting with /", _stats_uri, text=True)


def _credentials(x: str) -> tuple[str, str]:
    user, colon, password = x.partition(":")
    if not colon or not user or _UNSAFE_RE.search(x):
        raise _Mismatch()
    return user, password


def stats_auth(v: Value) -> tuple[tuple[str, str], ...]:
    """`auth`: one USER:PASSWORD or a list of them (HAProxy's `stats auth`, repeated)."""
    one = scalar("USER:PASSWORD, or a list of them", _credentials, text=True)
    items = [v] if v.is_scalar else v.elements()
    return tuple(one(item) for item in items)


_REALM_RE = re.compile(r'[ -~]+')  # printable ASCII, spaces too (it goes in a header)


def _realm(x: str | None) -> str:
    if not x or not _REALM_RE.fullmatch(x) or '"' in x or "\\" in x:
        raise _Mismatch()
    return x


realm = scalar("a name without quotes or control characters", _realm, text=True)


def _host_header(x: str | None) -> str:
    if not x or _UNSAFE_RE.search(x):
        raise _Mismatch()
    return x


host_header = scalar("a host name", _host_header, text=True)

BALANCE_ALGORITHMS = ("roundrobin", "static-rr", "leastconn", "source", "uri", "random")
BALANCE_HINT = "one of " + ", ".join(BALANCE_ALGORITHMS) + " or hdr(NAME)"


def _balance(x: str | None) -> tuple[str, str | None]:
    if x is not None and x in BALANCE_ALGORITHMS:
        return x, None
    m = re.fullmatch(r"hdr\((.*)\)", x or "")
    if m is None:
        raise _Mismatch()
    if not _TOKEN_RE.fullmatch(m[1]):
        raise ValueError(f"expected a header name in hdr(NAME), got {show(x)}")
    return "hdr", m[1]


balance = scalar(BALANCE_HINT, _balance, text=True)

STICK_ON_HINT = "src, req.cook(NAME) or req.hdr(NAME)"


def _stick_on(x: str | None) -> tuple[str, str | None]:
    """``src`` -> ("src", None); ``req.cook(NAME)`` -> ("cookie", NAME);
    ``req.hdr(NAME)`` -> ("hdr", name in lower case, as header names compare)."""
    if x == "src":
        return "src", None
    m = re.fullmatch(r"req\.(cook|hdr)\((.*)\)", x or "")
    if m is None:
        raise _Mismatch()
    what = "a cookie name" if m[1] == "cook" else "a header name"
    if not _TOKEN_RE.fullmatch(m[2]):
        raise ValueError(f"expected {what} in req.{m[1]}(NAME), got {show(x)}")
    return ("cookie", m[2]) if m[1] == "cook" else ("hdr", m[2].lower())


stick_on = scalar(STICK_ON_HINT, _stick_on, text=True)


STORE_HINT = ("conn_cur, conn_cnt, conn_rate(PERIOD), http_req_cnt, http_req_rate(PERIOD), "
              "http_err_cnt, http_err_rate(PERIOD), gpc0 or gpc0_rate(PERIOD)")
_STORE_COUNTERS = ("conn_cur", "conn_cnt", "http_req_cnt", "http_err_cnt", "gpc0")
_STORE_RATES = ("conn_rate", "http_req_rate", "http_err_rate", "gpc0_rate")
_STORE_RE = re.compile(r"([a-z0-9_]+)(?:\((.*)\))?")


def parse_store_item(text: str) -> tuple[str, int]:
    """One ``store`` word of a stick table: (name, period in ms, 0 for counters)."""
    m = _STORE_RE.fullmatch(text.strip())
    if m is None or m[1] not in _STORE_COUNTERS + _STORE_RATES:
        raise ValueError(f"expected {STORE_HINT}, got {show(text)}")
    if m[1] in _STORE_COUNTERS:
        if m[2] is not None:
            raise ValueError(f"{m[1]} takes no period, got {show(text)}")
        return m[1], 0
    if not m[2]:
        raise ValueError(f"{m[1]} needs a period, like {m[1]}(10s)")
    period = parse_duration(m[2])
    if not 0.001 <= period <= 86400 * 24:
        raise ValueError(f"expected a period from 1ms to 24d in {show(text)}")
    return m[1], int(period * 1000)


def store(v: Value) -> tuple[tuple[str, int], ...]:
    """``store``: a list of data names, or one comma-separated string as in HAProxy."""
    items = v.elements() if not v.is_scalar else [v]
    out: dict[str, int] = {}
    for item in items:
        if not item.is_scalar or item.is_null:
            raise item.error(f"expected {STORE_HINT}, got {item.describe()}")
        for word in (item.text or "").split(","):
            try:
                name, period = parse_store_item(word)
            except ValueError as exc:
                raise item.error(str(exc)) from None
            if name in out:
                raise item.error(f"{name} is stored twice")
            out[name] = period
    return tuple(out.items())


# -- retries (HAProxy's retry-on and option redispatch) ---------------------------------------

RETRY_CONDITIONS = ("conn-failure", "empty-response", "junk-response", "response-timeout",
                    "0rtt-rejected")
RETRY_STATUSES = (401, 403, 404, 408, 425, 500, 501, 502, 503, 504)
ALL_RETRYABLE = (*RETRY_CONDITIONS, 500, 502, 503, 504)
RETRY_HINT = ("retry-on words: none, all-retryable-errors, " + ", ".join(RETRY_CONDITIONS)
              + " or a status among " + " ".join(map(str, RETRY_STATUSES)))


def retry_on(v: Value) -> tuple[str | int, ...]:
    """``retry-on``: space-separated words (or a list), as in HAProxy; ``none`` alone turns
    retries off. Conditions are kept as words, statuses as integers."""
    items = v.elements() if not v.is_scalar else [v]
    out: list[str | int] = []
    words: list[str] = []
    for item in items:
        if not item.is_scalar or item.is_null:
            raise item.error(f"expected {RETRY_HINT}, got {item.describe()}")
        for word in (item.text or "").split():
            words.append(word)
            if word == "none":
                continue
            if word == "all-retryable-errors":
                found: tuple[str | int, ...] = ALL_RETRYABLE
            elif word in RETRY_CONDITIONS:
                found = (word,)
            elif word.isdigit() and int(word) in RETRY_STATUSES:
                found = (int(word),)
            else:
                raise item.error(f"unknown retry-on word {word!r} (expected {RETRY_HINT})")
            out += [f for f in found if f not in out]
    if not words:
        raise v.error(f"expected {RETRY_HINT}, got nothing")
    if "none" in words and len(words) > 1:
        raise v.error("retry-on none cannot be combined with other words")
    return tuple(out)


def redispatch(v: Value) -> int:
    """``redispatch``: true (on the last retry, HAProxy's default), false, or HAProxy's
    interval: N > 0 on every Nth retry, N < 0 on every (retries + 1 + N)th. 0: never."""
    if v.is_scalar and isinstance(v.python, bool):
        return -1 if v.python else 0
    x = v.python if v.is_scalar else None
    if not isinstance(x, int) or isinstance(x, bool):
        raise v.error(f"expected true, false or a retry interval like 1 or -1, got {v.describe()}")
    return x


# -- TLS to servers ---------------------------------------------------------------------------

SERVER_NAME_HINT = "a host name like app.example.com"
SYSTEM_CA = "@system-ca"  # HAProxy 2.6's word for the system's default CAs


def _server_name(x: str | None) -> str:
    """``sni`` and ``verifyhost``: a literal DNS name. HAProxy's ``sni`` takes a sample
    expression; pylb takes a name only, so say so rather than "expected a host name"."""
    if x is not None and "(" in x:
        raise ValueError(
            f"expected {SERVER_NAME_HINT}, got {show(x)}: pylb takes a literal name here,"
            " not a sample expression"
        )
    if not x or not _HOSTNAME_RE.fullmatch(x) or _ipv4(x.rstrip(".")) is not None:
        raise _Mismatch()  # SNI carries no IP literal (RFC 6066); certificates name hosts
    return x


server_name = scalar(SERVER_NAME_HINT, _server_name, text=True)


def read_ca_file(file: str) -> bytes:
    """The PEM bytes of a CA file, checked as OpenSSL will load them (raises OSError when
    unreadable, ValueError with the reason when not PEM certificates)."""
    import ssl  # here, to keep this section self-contained

    with open(file, "rb") as f:
        pem = f.read()
    try:
        text = pem.decode("ascii")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (UnicodeDecodeError, ValueError, ssl.SSLError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            reason = "not ASCII text"
        else:  # OpenSSL's words, without where in _ssl.c they come from
            reason = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", exc.args[-1] if exc.args else "")
        raise ValueError(
            f"ca-file {file!r} is not a PEM file of CA certificates ({reason.lower()})"
        ) from None
    return pem


def ca_file(v: Value) -> bytes | None:
    """``ca-file``: read now, by the master, so that workers never open it; None (the
    system's CAs) for ``@system-ca``."""
    file = path(v)
    if file == SYSTEM_CA:
        return None
    try:
        return read_ca_file(file)
    except OSError as exc:
        raise v.error(f"cannot read ca-file {file!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise v.error(str(exc)) from None
