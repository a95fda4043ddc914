"""HAProxy's rule words -> the plain dataclasses of lb.config.model.

lb.config calls these while it loads a file, so every mistake is reported at its line
before anything starts; lb.rules.engine compiles the result. Functions take one rule's text
and raise ValueError with the operator's message (lb.config adds ``file:line: key:``).
Files that rules name (errorfiles, ``return ... file``, maps) are read here, relative to the
directory pylb starts in, as HAProxy does.

This module imports only lb.config.model, because lb.config imports it.
"""

from __future__ import annotations

import codecs
import difflib
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus

from lb.config.model import (
    AclTest,
    AclUse,
    Condition,
    ConnectionRule,
    DenyRule,
    DisableL7RetryRule,
    HeaderRule,
    HttpRequestRule,
    IncGpc0Rule,
    Payload,
    RedirectRule,
    ReturnRule,
    Sample,
    TcpConnectionRule,
    Template,
    TrackRule,
    UseBackend,
)

NAME_RE = re.compile(r"[A-Za-z0-9_.:-]+")  # ACL, backend and map names, as in HAProxy
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # header and cookie names
_CALL_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(?:\(([^()]*)\))?")
_VAR_RE = re.compile(r"([a-z]+)\.([A-Za-z0-9_.]+)")
_INT_RE = re.compile(r"[0-9]+")
_RANGE_RE = re.compile(r"([0-9]*):([0-9]*)")
_IPV4_RE = re.compile(r"[0-9]+(?:\.[0-9]+){0,3}")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MAP_LINE_RE = re.compile(r"([^ \t]+)[ \t]*(.*)")

# Statuses HAProxy has an error page (and so an errorfile) for.
ERROR_CODES = (200, 400, 401, 403, 404, 405, 407, 408, 410, 413, 414, 425, 429, 431, 500, 501,
               502, 503, 504)
REDIRECT_CODES = (301, 302, 303, 307, 308)
CONDITION_WORDS = ("if", "unless")


def _suggest(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _one_of(options: Iterable[str]) -> str:
    items = list(options)
    return ", ".join(items[:-1]) + " or " + items[-1]


def _unknown(what: str, word: str, known: Iterable[str], then: str = "") -> str:
    """``unknown <what> 'x' (did you mean y?); expected a, b or c``."""
    options = list(known)
    return f"unknown {what} {word!r}{_suggest(word, options)}; expected {_one_of(options)}{then}"


# -- words ----------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Split a rule into words as HAProxy does: blanks separate, "..." and '...' group, and
    a backslash makes a blank, a quote, # or a backslash literal. Before anything else the
    backslash is kept, so regexes such as ``\\.png$`` need no doubling."""
    out: list[str] = []
    cur: list[str] = []
    started = False
    quote = ""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                cur.append(c)
        elif quote == '"':
            if c == '"':
                quote = ""
            elif c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                i += 1
                cur.append(text[i])
            else:
                cur.append(c)
        elif c in " \t\r\n":
            if started:
                out.append("".join(cur))
                cur, started = [], False
        elif c in "\"'":
            quote, started = c, True
        elif c == "\\" and i + 1 < n and text[i + 1] in " \t\\\"'#":
            i += 1
            cur.append(text[i])
            started = True
        else:
            cur.append(c)
            started = True
        i += 1
    if quote:
        raise ValueError(f"missing closing {quote} quote")
    if started:
        out.append("".join(cur))
    return out


# -- fetches and converters -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchSpec:
    """A fetch keyword: its canonical fetch, output type (str, int or ip), argument kind
    ("", header, cookie, backend or var), the match an ACL derivative implies (path_beg:
    beg) and whether patterns ignore case by default (method)."""

    fetch: str
    type: str
    arg: str
    match: str | None = None
    icase: bool = False


_BASE_FETCHES = {
    "src": FetchSpec("src", "ip", ""),
    "path": FetchSpec("path", "str", ""),
    "url": FetchSpec("url", "str", ""),
    "method": FetchSpec("method", "str", "", icase=True),
    "host": FetchSpec("host", "str", ""),
    "hdr": FetchSpec("hdr", "str", "header"),
    "req.hdr": FetchSpec("hdr", "str", "header"),
    "req.cook": FetchSpec("cook", "str", "cookie"),
    "cook": FetchSpec("cook", "str", "cookie"),
    "nbsrv": FetchSpec("nbsrv", "int", "backend"),
    "var": FetchSpec("var", "str", "var"),
    # The client connection's TLS (HAProxy's section 7.3.4). On a plain connection the
    # booleans ssl_fc, ssl_fc_has_sni and ssl_fc_is_resumed are 0; the others give no sample.
    "ssl_fc": FetchSpec("ssl_fc", "bool", ""),
    "ssl_fc_has_sni": FetchSpec("ssl_fc_has_sni", "bool", ""),
    "ssl_fc_sni": FetchSpec("ssl_fc_sni", "str", ""),
    "ssl_fc_protocol": FetchSpec("ssl_fc_protocol", "str", ""),
    "ssl_fc_cipher": FetchSpec("ssl_fc_cipher", "str", ""),
    "ssl_fc_alpn": FetchSpec("ssl_fc_alpn", "str", ""),
    "ssl_fc_is_resumed": FetchSpec("ssl_fc_is_resumed", "bool", ""),
    "ssl_c_used": FetchSpec("ssl_c_used", "bool", ""),
}
DERIVED_MATCHES = ("beg", "end", "sub", "reg", "len")
FETCHES: dict[str, FetchSpec] = {
    **_BASE_FETCHES,
    **{
        f"{base}_{match}": FetchSpec(_BASE_FETCHES[base].fetch, "str",
                                     _BASE_FETCHES[base].arg, match)
        for base in ("path", "url", "hdr", "req.cook", "cook")
        for match in DERIVED_MATCHES
    },
    # HAProxy's only derivatives of ssl_fc_sni
    "ssl_fc_sni_end": FetchSpec("ssl_fc_sni", "str", "", "end"),
    "ssl_fc_sni_reg": FetchSpec("ssl_fc_sni", "str", "", "reg"),
}
# map(NAME[,DEFAULT]) and its match kinds: exact (map, map_str), prefix, domain, IPv4 network
MAP_CONVERTERS = ("map", "map_str", "map_beg", "map_dom", "map_ip")
CONVERTERS = ("lower", "upper", *MAP_CONVERTERS)

MATCHES = ("str", "beg", "end", "sub", "reg", "len", "found", "bool", "int", "ip")
STRING_MATCHES = ("str", "beg", "end", "sub", "reg")
DEFAULT_MATCH = {"str": "str", "int": "int", "ip": "ip", "bool": "bool"}
# Match methods that make no sense for a sample type.
_INCOMPATIBLE = {"str": ("bool",), "int": ("ip",), "ip": ("int", "bool"), "bool": ("ip",)}

# -- stick counters: the sc_*, scN_* and src_* fetches ----------------------------------------
# Not in FETCHES (there are too many names): parse_sample reads them with _table_fetch.

SC_COUNT = 3  # stick counters a connection may track: sc0, sc1 and sc2, as in HAProxy
TABLE_DATA = ("conn_cur", "conn_cnt", "conn_rate", "http_req_cnt", "http_req_rate",
              "http_err_cnt", "http_err_rate", "gpc0", "gpc0_rate")
# What a fetch's name asks for -> the operation (a data name, inc_gpc0, clr_gpc0, tracked)
_SC_OPERATIONS = {**{data: data for data in TABLE_DATA}, "get_gpc0": "gpc0",
                  "inc_gpc0": "inc_gpc0", "clr_gpc0": "clr_gpc0", "tracked": "tracked"}
_SRC_OPERATIONS = {word: op for word, op in _SC_OPERATIONS.items() if op != "tracked"}
COUNTER_FETCHES = ("sc", "src_table")  # their canonical fetches (Sample.fetch)
_TABLE_FETCH_RE = re.compile(r"(sc([0-9]*)|src)_([a-z0-9_]+)")
TABLE_FETCHES = (  # every name, for suggestions
    *(f"sc_{word}" for word in _SC_OPERATIONS),
    *(f"sc{n}_{word}" for n in range(SC_COUNT) for word in _SC_OPERATIONS),
    *(f"src_{word}" for word in _SRC_OPERATIONS),
)
# The client connection's TLS: tcp-request connection rules do not see it (yet), so they
# (and tcp-mode ACLs) are refused these fetches rather than given a plain connection's answer.
TLS_FETCHES = frozenset(("ssl_fc", "ssl_fc_has_sni", "ssl_fc_sni", "ssl_fc_protocol",
                         "ssl_fc_cipher", "ssl_fc_alpn", "ssl_fc_is_resumed", "ssl_c_used"))
# Fetches not usable in tcp-request connection rules: those that read the HTTP request,
# and the TLS ones above.
HTTP_FETCHES = frozenset(("path", "url", "method", "host", "hdr", "cook")) | TLS_FETCHES


def sc_number(text: str, what: str) -> int:
    """A stick counter number, 0 to 2."""
    if not _INT_RE.fullmatch(text) or int(text) >= SC_COUNT:
        raise ValueError(f"{what}: no stick counter {text!r}; expected 0, 1 or 2 (pylb has "
                         "sc0, sc1 and sc2)")
    return int(text)


def _table_fetch(name: str, args: tuple[str, ...] | None) -> tuple[tuple[str, ...], FetchSpec]:
    """``sc_http_req_rate(0[,TABLE])``, ``sc0_http_req_rate([TABLE])``,
    ``src_http_req_rate([TABLE])`` and the like: (Sample.args, spec). Raises ValueError
    for a name that is none of them."""
    m = _TABLE_FETCH_RE.fullmatch(name)
    operations = _SRC_OPERATIONS if m is not None and m[1] == "src" else _SC_OPERATIONS
    if m is None or m[3] not in operations:
        hint = _suggest(name, TABLE_FETCHES) or _suggest(name, FETCHES)
        raise ValueError(f"unknown fetch {name!r}{hint}")
    operation = operations[m[3]]
    given = [] if args is None or args == ("",) else list(args)
    table_hint = "an optional table name"
    if m[1] == "src":
        number = None
    elif m[1] == "sc":
        if not given or not given[0]:
            raise ValueError(f"{name} needs a stick counter number: {name}(0)")
        number = sc_number(given.pop(0), name)
        table_hint = "a stick counter number and " + table_hint
    else:
        number = sc_number(m[2], name)
    if len(given) > 1:
        raise ValueError(f"{name} takes {table_hint}")
    table = given[0] if given else ""
    if table and not NAME_RE.fullmatch(table):
        raise ValueError(f"expected a table name in {name}(), got {table!r}")
    kind = "bool" if operation == "tracked" else "int"
    if number is None:
        return (operation, table), FetchSpec("src_table", kind, "table")
    return (operation, str(number), table), FetchSpec("sc", kind, "table")


def fetch_text(sample: Sample) -> str:
    """The fetch of a sample as written, without converters: ``sc0_gpc0(www)``."""
    m = _CALL_RE.match(sample.text)
    return m[0] if m is not None else sample.text
OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge")


def _fetch_args(name: str, spec: FetchSpec, args: tuple[str, ...] | None) -> tuple[str, ...]:
    """The fetch's arguments, checked for its kind."""
    if spec.arg == "":
        if args is not None:
            raise ValueError(f"{name} takes no arguments")
        return ()
    what = {"header": "a header name", "cookie": "a cookie name", "backend": "a backend name",
            "var": "a variable name like proc.NAME"}[spec.arg]
    if not args or not args[0]:
        raise ValueError(f"{name} needs {what}: {name}(NAME)")
    if spec.arg == "var":
        if len(args) > 2:
            raise ValueError(f"{name} takes a variable name and an optional default")
        m = _VAR_RE.fullmatch(args[0])
        if m is None:
            raise ValueError(f"expected {what} in {name}(), got {args[0]!r}")
        if m[1] != "proc":
            raise ValueError(
                f"only proc.NAME variables exist in pylb (set with 'set var' on the stats "
                f"socket), got {args[0]!r}"
            )
        return args
    if len(args) > 1:
        raise ValueError(f"{name} takes one argument, {what}")
    pattern = NAME_RE if spec.arg == "backend" else _TOKEN_RE
    if not pattern.fullmatch(args[0]):
        raise ValueError(f"expected {what} in {name}(), got {args[0]!r}")
    return (args[0].lower(),) if spec.arg == "header" else args


def _converter(name: str, args: tuple[str, ...] | None) -> tuple[str, tuple[str, ...]]:
    if name not in CONVERTERS:
        raise ValueError(_unknown("converter", name, CONVERTERS))
    if name not in MAP_CONVERTERS:
        if args is not None:
            raise ValueError(f"converter {name} takes no arguments")
        return name, ()
    if not args or not args[0] or len(args) > 2:
        raise ValueError(f"converter {name} needs a map name and an optional default: "
                         f"{name}(NAME) or {name}(NAME,DEFAULT)")
    if not NAME_RE.fullmatch(args[0]):
        raise ValueError(f"expected a map name in {name}(), got {args[0]!r}")
    return name, args


def _calls(text: str) -> list[tuple[str, tuple[str, ...] | None]]:
    """``a(x,y),b,c(z)`` -> [("a", ("x", "y")), ("b", None), ("c", ("z",))]."""
    out: list[tuple[str, tuple[str, ...] | None]] = []
    pos = 0
    while True:
        m = _CALL_RE.match(text, pos)
        if m is None:
            raise ValueError(f"invalid sample expression {text!r} (expected like "
                             "hdr(host),lower)")
        args = None if m[2] is None else tuple(a.strip() for a in m[2].split(","))
        out.append((m[1], args))
        pos = m.end()
        if pos == len(text):
            return out
        if text[pos] != ",":
            raise ValueError(f"invalid sample expression {text!r} (expected like "
                             "hdr(host),lower)")
        pos += 1


def parse_sample(text: str, *, in_acl: bool = True) -> tuple[Sample, FetchSpec]:
    """A fetch with its converters. ACL derivatives (path_beg...) only exist in ACLs and
    take no converters, as in HAProxy."""
    calls = _calls(text)
    name, args = calls[0]
    spec = FETCHES.get(name)
    if spec is None:
        if _TABLE_FETCH_RE.fullmatch(name) is None:
            known = list(FETCHES) if in_acl else list(_BASE_FETCHES)
            hint = _suggest(name, known) or _suggest(name, TABLE_FETCHES)
            raise ValueError(f"unknown fetch {name!r}{hint}")
        table_args, spec = _table_fetch(name, args)
        converters = tuple(_converter(n, a) for n, a in calls[1:])
        return Sample(spec.fetch, table_args, converters, text), spec
    if spec.match is not None:
        base = name.rpartition("_")[0]
        first = _CALL_RE.match(text)
        end = first.end() if first is not None else len(name)
        if not in_acl:
            raise ValueError(f"{name} is an ACL keyword; write {base}{text[len(name):end]} here")
        if len(calls) > 1:
            raise ValueError(f"{name} cannot be followed by converters; write "
                             f"{base}{text[len(name):]} -m {spec.match}")
    converters = tuple(_converter(n, a) for n, a in calls[1:])
    return Sample(spec.fetch, _fetch_args(name, spec, args), converters, text), spec


# -- patterns -------------------------------------------------------------------------------


def parse_int_pattern(value: str, operator: str = "eq") -> tuple[int | None, int | None, bool]:
    """An integer pattern as (low, high, outside): the value matches when it is within
    [low, high] (None: unbounded), or not within it when ``outside`` (operator ne).
    Ranges are ``LOW:HIGH`` with either bound left out, as in HAProxy."""
    if _INT_RE.fullmatch(value):
        n = int(value)
        return {
            "eq": (n, n, False),
            "ne": (n, n, True),
            "lt": (None, n - 1, False),
            "le": (None, n, False),
            "gt": (n + 1, None, False),
            "ge": (n, None, False),
        }[operator]
    m = _RANGE_RE.fullmatch(value)
    if m is None or value == ":":
        raise ValueError(f"expected an integer or a range like 10:20, got {value!r}")
    if operator != "eq":
        raise ValueError(f"{operator} cannot be used with a range ({value!r})")
    low = int(m[1]) if m[1] else None
    high = int(m[2]) if m[2] else None
    if low is not None and high is not None and low > high:
        raise ValueError(f"empty range {value!r}")
    return low, high, False


def parse_ip_pattern(value: str) -> tuple[int, int, int]:
    """An address or network as (version, network, mask) integers: ``10.0.0.0/8``,
    ``10.0.0.0/255.0.0.0``, ``192.168.1.7``, ``2001:db8::/32``. As in HAProxy, short IPv4
    forms are read like inet_aton (``127.1`` is 127.0.0.1); host names are refused."""
    address, slash, mask = value.partition("/")
    hint = f"expected an IP address or network like 10.0.0.0/8, got {value!r}"
    if ":" in address:
        try:
            number = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        except OSError:
            raise ValueError(hint) from None
        version, width = 6, 128
    else:
        if not _IPV4_RE.fullmatch(address):
            raise ValueError(hint + " (host names are not supported)")
        try:
            number = int.from_bytes(socket.inet_aton(address), "big")
        except OSError:
            raise ValueError(hint) from None
        version, width = 4, 32
    full = (1 << width) - 1
    if not slash:
        bits_mask = full
    elif _INT_RE.fullmatch(mask) and int(mask) <= width:
        bits_mask = full ^ (full >> int(mask))
    elif version == 4 and _IPV4_RE.fullmatch(mask) and mask.count(".") == 3:
        bits_mask = int.from_bytes(socket.inet_aton(mask), "big")
    else:
        raise ValueError(f"invalid netmask {mask!r} in {value!r}")
    return version, number & bits_mask, bits_mask


def compile_regex(value: str, icase: bool) -> re.Pattern[str]:
    try:
        return re.compile(value, re.IGNORECASE if icase else 0)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from None


# -- ACLs and conditions --------------------------------------------------------------------


def _acl_words(ws: list[str], text: str, line: int) -> AclTest:
    """``<criterion> [flags] [operator] [values...]``, as HAProxy's ``acl`` line."""
    if not ws:
        raise ValueError("expected an ACL like path_beg /api")
    sample, spec = parse_sample(ws[0])
    kind = "str" if sample.converters else spec.type
    implied = None if sample.converters else spec.match
    icase = spec.icase and not sample.converters
    explicit: str | None = None
    i = 1
    while i < len(ws) and ws[i].startswith("-"):
        flag = ws[i]
        i += 1
        if flag == "--":
            break
        if flag == "-i":
            icase = True
        elif flag == "-m":
            if i == len(ws):
                raise ValueError(f"-m needs a match method ({_one_of(MATCHES)})")
            method = ws[i]
            i += 1
            if method not in MATCHES:
                raise ValueError(_unknown("match method", method, MATCHES))
            if implied is not None:
                keyword = ws[0].split("(", 1)[0]
                raise ValueError(f"{keyword} already means -m {implied}; write "
                                 f"{keyword.rpartition('_')[0]}{ws[0][len(keyword):]} "
                                 f"-m {method}")
            if explicit is not None:
                raise ValueError("-m may be given once")
            explicit = method
        elif flag in ("-f", "-M", "-u", "-n"):
            raise ValueError(f"ACL flag {flag} is not supported by pylb")
        else:
            raise ValueError(f"unknown ACL flag {flag!r} (write -- before a value that starts "
                             "with -)")
    match = explicit or implied or DEFAULT_MATCH[kind]
    if match in _INCOMPATIBLE[kind]:
        raise ValueError(f"-m {match} cannot match {ws[0]}, which gives "
                         f"{'an' if kind in ('int', 'ip') else 'a'} {kind}")
    if match not in STRING_MATCHES:
        if icase and not spec.icase:
            raise ValueError(f"-i only applies to string matches, not -m {match}")
        icase = False
    values = ws[i:]
    operator = "eq"
    if match in ("int", "len") and values and values[0] in OPERATORS:
        operator = values.pop(0)
    if match in ("found", "bool"):
        if values:
            raise ValueError(f"-m {match} takes no values, got {values[0]!r}")
    elif not values:
        raise ValueError(f"expected at least one value to match after {ws[0]} "
                         "(or -m found to test presence)")
    for value in values:
        if match in ("int", "len"):
            parse_int_pattern(value, operator)
        elif match == "ip":
            parse_ip_pattern(value)
        elif match == "reg":
            compile_regex(value, icase)
    return AclTest(sample, match, icase, operator, tuple(values), text, line)


def parse_acl(text: str, line: int) -> AclTest:
    """One line of a named ACL: ``hdr(host) -i old.example.com``."""
    return _acl_words(words(text), text, line)


def _condition(ws: list[str], line: int) -> Condition:
    """``if|unless`` then ``[!]acl ... [|| [!]acl ...]``, with ``{ anonymous acl }``."""
    keyword, rest = ws[0], ws[1:]
    if not rest:
        raise ValueError(f"{keyword} needs a condition")
    groups: list[tuple[AclUse, ...]] = []
    group: list[AclUse] = []
    i = 0
    while i < len(rest):
        word = rest[i]
        if word in ("||", "or"):
            if not group:
                raise ValueError(f"{word} needs an ACL on each side")
            groups.append(tuple(group))
            group = []
            i += 1
            continue
        negate = False
        while True:  # "!" alone or in front of a name; "!!" cancels out
            name = word.lstrip("!")
            negate ^= (len(word) - len(name)) % 2 == 1
            if name:
                break
            i += 1
            if i == len(rest):
                raise ValueError("! must be followed by an ACL")
            word = rest[i]
        if name == "{":
            try:
                end = rest.index("}", i + 1)
            except ValueError:
                raise ValueError("missing } after {") from None
            inner = rest[i + 1 : end]
            if "{" in inner:
                raise ValueError("anonymous ACLs cannot be nested")
            group.append(AclUse(None, _acl_words(inner, " ".join(inner), line), negate))
            i = end + 1
            continue
        if name == "}":
            raise ValueError("} without {")
        if name.startswith("{") or name.endswith("}"):
            raise ValueError("braces must be separate words: { path_beg /x }")
        if name in CONDITION_WORDS or not NAME_RE.fullmatch(name):
            raise ValueError(f"expected an ACL name, got {name!r}")
        group.append(AclUse(name, None, negate))
        i += 1
    if not group:
        raise ValueError(f"{rest[-1]} needs an ACL on each side")
    groups.append(tuple(group))
    return Condition(keyword == "unless", tuple(groups), " ".join(ws))


def parse_condition(text: str, line: int) -> Condition:
    """A condition alone, as ``monitor-fail`` takes it: ``if``/``unless`` is optional."""
    ws = words(text)
    if not ws:
        raise ValueError("expected a condition like site_dead || maint")
    return _condition(ws if ws[0] in CONDITION_WORDS else ["if", *ws], line)


def _tail(ws: list[str], i: int, line: int) -> Condition | None:
    """The optional condition that ends a rule at word ``i``."""
    if i == len(ws):
        return None
    if ws[i] in CONDITION_WORDS:
        return _condition(ws[i:], line)
    raise ValueError(f"unexpected {ws[i]!r} (expected if or unless)")


# -- templates: %[sample] in values ---------------------------------------------------------


def parse_template(text: str) -> Template:
    """Literal text with ``%[fetch,converters]`` samples; ``%%`` is a literal %. HAProxy's
    other log-format directives are not supported."""
    parts: list[str | Sample] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "%":
            buf.append(c)
            i += 1
            continue
        following = text[i + 1 : i + 2]
        if following == "%":
            buf.append("%")
            i += 2
        elif following == "[":
            end = text.find("]", i + 2)
            if end < 0:
                raise ValueError(f"missing ] after %[ in {text!r}")
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(parse_sample(text[i + 2 : end], in_acl=False)[0])
            i = end + 1
        else:
            raise ValueError(f"unsupported %{following} in {text!r}: only %[sample] and %% "
                             "(a literal %) are supported")
    if buf:
        parts.append("".join(buf))
    for part in parts:
        if isinstance(part, str) and _CONTROL_RE.search(part):
            raise ValueError(f"control characters are not allowed in {text!r}")
    return tuple(parts)


def static_text(template: Template) -> str | None:
    """The template's text when it has no samples."""
    if all(isinstance(part, str) for part in template):
        return "".join(part for part in template if isinstance(part, str))
    return None


# -- files ----------------------------------------------------------------------------------


def read_file(path: str, what: str) -> bytes:
    """A file's bytes; relative paths from the directory pylb starts in."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror}") from None


_DROPPED_HEADERS = (b"content-length", b"transfer-encoding", b"connection", b"keep-alive")


def parse_errorfile(data: bytes, path: str) -> bytes:
    """A whole HTTP response as written in an errorfile, made safe to send as is: status
    line in HTTP/1.1, CRLF line ends, its own Content-Length and ``Connection: close``
    (those the file has are replaced). An empty file stays empty: close without answering,
    HAProxy's ``errorfile 408 /dev/null`` idiom."""
    if not data:
        return b""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf < 0 and lf < 0:
        raise ValueError(f"errorfile {path!r} has no empty line after its headers")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        head, body = data[:crlf], data[crlf + 4 :]
    else:
        head, body = data[:lf], data[lf + 2 :]
    lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    m = re.fullmatch(rb"HTTP/1\.[01] ([2-5][0-9][0-9])(?: (.*))?", lines[0])
    if m is None:
        raise ValueError(f"errorfile {path!r} must start with a status line like "
                         "HTTP/1.1 503 Service Unavailable")
    status = int(m[1])
    phrase = m[2] or reason(status).encode()
    out = [b"HTTP/1.1 %d %s" % (status, phrase)]
    for number, line in enumerate(lines[1:], 2):
        name, colon, _ = line.partition(b":")
        if not colon or not _TOKEN_RE.fullmatch(name.decode("latin-1")):
            raise ValueError(f"errorfile {path!r} line {number}: expected a header like "
                             "Name: value")
        if name.lower() not in _DROPPED_HEADERS:
            out.append(line)
    out.append(b"Content-Length: %d" % len(body))
    out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def read_errorfile(path: str) -> bytes:
    return parse_errorfile(read_file(path, "errorfile"), path)


def errorfile_status(text: str) -> int:
    """The status of an ``errorfile`` entry: one HAProxy has an error page for."""
    if not _INT_RE.fullmatch(text) or int(text) not in ERROR_CODES:
        raise ValueError(f"expected one of {_one_of(str(c) for c in ERROR_CODES)}, got {text!r}")
    return int(text)


def check_map_file(path: str) -> None:
    """Refuse what load_map refuses, without building the map (a configuration check
    must stay cheap for a file of a million lines): OSError when the file cannot be read,
    ValueError when it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line += chunk.count(b"\n", 0, max(exc.start, 0))
                raise ValueError(f"map file {path!r} line {line} is not valid UTF-8") from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"map file {path!r} line {line} is not valid UTF-8") from None


def load_map(path: str) -> dict[str, str]:
    """A map file as HAProxy reads it: one ``key value`` per line, the key the first word,
    the value the rest of the line (blanks around it dropped); empty lines and lines
    starting with # are skipped; the first of repeated keys wins. Raises OSError when the
    file cannot be read, ValueError when it is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"map file {path!r} line {line} is not valid UTF-8") from None
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        m = _MAP_LINE_RE.fullmatch(line)
        if m is not None:
            out.setdefault(m[1], m[2])
    return out


# -- http-request rules ---------------------------------------------------------------------

TRACK_ACTIONS = tuple(f"track-sc{n}" for n in range(SC_COUNT))
ACTIONS = ("deny", "redirect", "return", "set-header", "add-header", "del-header",
           *TRACK_ACTIONS, "sc-inc-gpc0", "disable-l7-retry")
CONNECTION_ACTIONS = ("accept", "reject", *TRACK_ACTIONS, "sc-inc-gpc0")
_TRACK_RE = re.compile(r"track-sc([0-9]+)")
_INC_GPC0_RE = re.compile(r"sc-inc-gpc0(?:\(([^()]*)\))?")
_UNSUPPORTED_SC_ACTIONS = re.compile(r"sc-(?:inc-gpc[0-9]*|set-gpt[0-9]*|add-gpc|"
                                     r"clr-gpc[0-9]*)(?:\(.*\))?")
_PAYLOAD_OPTIONS = ("status", "content-type", "default-errorfiles", "errorfile", "file",
                    "string", "hdr")
_UNSUPPORTED_PAYLOAD = ("errorfiles", "lf-file", "lf-string")
_REDIRECT_OPTIONS = ("code", "drop-query", "append-slash")
_UNSUPPORTED_REDIRECT = ("set-cookie", "set-cookie-fmt", "clear-cookie", "keep-query",
                         "ignore-empty")


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _argument(ws: list[str], i: int, what: str) -> str:
    if i + 1 >= len(ws) or ws[i + 1] in CONDITION_WORDS:
        raise ValueError(f"{ws[i]} needs {what}")
    return ws[i + 1]


def _status(text: str) -> int:
    if not _INT_RE.fullmatch(text) or not 200 <= int(text) <= 599:
        raise ValueError(f"expected a status from 200 to 599, got {text!r}")
    return int(text)


def _header_name(text: str) -> str:
    if not _TOKEN_RE.fullmatch(text):
        raise ValueError(f"expected a header name, got {text!r}")
    return text


def _payload(ws: list[str], action: str) -> tuple[Payload, int]:
    """The options of ``deny`` and ``return``, up to the condition."""
    status = 403 if action == "deny" else 200
    content_type: str | None = None
    source: str | None = None
    body = b""
    errorfile: bytes | None = None
    headers: list[tuple[str, Template]] = []
    i = 1
    while i < len(ws) and ws[i] not in CONDITION_WORDS:
        option = ws[i]
        if option in ("status", "deny_status") and (option == "status" or action == "deny"):
            status = _status(_argument(ws, i, "a status"))
            i += 2
        elif option == "content-type":
            content_type = _argument(ws, i, "a media type like text/html")
            if _CONTROL_RE.search(content_type):
                raise ValueError(f"invalid content-type {content_type!r}")
            i += 2
        elif option == "hdr":
            name = _header_name(_argument(ws, i, "a header name and a value"))
            value = _argument(ws, i + 1, "a value")
            headers.append((name, parse_template(value)))
            i += 3
        elif option in ("default-errorfiles", "errorfile", "file", "string"):
            if source is not None:
                raise ValueError(f"{option} and {source} cannot be used together")
            source = option
            if option == "default-errorfiles":
                i += 1
                continue
            argument = _argument(ws, i, "a file" if option != "string" else "a string")
            if option == "errorfile":
                errorfile = read_errorfile(argument)
            elif option == "file":
                body = read_file(argument, "file")
            else:
                body = argument.encode()
            i += 2
        elif option in _UNSUPPORTED_PAYLOAD:
            raise ValueError(f"{action} option {option} is not supported by pylb")
        else:
            known = _PAYLOAD_OPTIONS + (("deny_status",) if action == "deny" else ())
            raise ValueError(_unknown(f"{action} option", option, known, ", then if or unless"))
    if source is None and action == "deny":
        source = "default-errorfiles"
    if source in ("default-errorfiles", "errorfile"):
        if status not in ERROR_CODES:
            raise ValueError(f"{source} needs a status pylb has an error page for "
                             f"({_one_of(str(c) for c in ERROR_CODES)}), got {status}")
        if content_type is not None or headers:
            raise ValueError(f"content-type and hdr cannot be used with {source}")
    elif source == "string" or (source == "file" and body):
        if content_type is None:
            raise ValueError(f"{source} needs content-type, like content-type text/html")
    elif content_type is not None:
        raise ValueError("content-type needs a body: file or string")
    payload = Payload(status, errorfile, source == "default-errorfiles", content_type, body,
                      tuple(headers))
    return payload, i


def _redirect(ws: list[str], line: int) -> RedirectRule:
    kinds = ("location", "prefix", "scheme")
    if len(ws) < 3 or ws[1] not in kinds or ws[2] in CONDITION_WORDS:
        raise ValueError("expected redirect location|prefix|scheme VALUE [code N]")
    kind, value = ws[1], parse_template(ws[2])
    text = static_text(value)
    if text == "":
        raise ValueError(f"redirect {kind} needs a value")
    if kind == "scheme" and text is not None and not _SCHEME_RE.fullmatch(text):
        raise ValueError(f"expected a scheme like https, got {text!r}")
    code, drop_query, append_slash = 302, False, False
    i = 3
    while i < len(ws) and ws[i] not in CONDITION_WORDS:
        option = ws[i]
        if option == "code":
            written = _argument(ws, i, "a status")
            if not _INT_RE.fullmatch(written) or int(written) not in REDIRECT_CODES:
                raise ValueError(f"expected a redirect code "
                                 f"({_one_of(str(c) for c in REDIRECT_CODES)}), got {written!r}")
            code = int(written)
            i += 2
            continue
        if option == "drop-query":
            drop_query = True
        elif option == "append-slash":
            append_slash = True
        elif option in _UNSUPPORTED_REDIRECT:
            raise ValueError(f"redirect option {option} is not supported by pylb")
        else:
            raise ValueError(_unknown("redirect option", option, _REDIRECT_OPTIONS,
                                      ", then if or unless"))
        i += 1
    return RedirectRule(kind, value, code, drop_query, append_slash, _tail(ws, i, line),
                        line)


def parse_http_request(text: str, line: int) -> HttpRequestRule:
    """One ``http-request`` rule: deny, redirect, return, set-header, add-header,
    del-header, track-scN, sc-inc-gpc0(N) or disable-l7-retry, then an optional condition."""
    ws = words(text)
    if not ws:
        raise ValueError(f"expected an action ({_one_of(ACTIONS)})")
    action = ws[0]
    if action in ("deny", "return"):
        payload, i = _payload(ws, action)
        cond = _tail(ws, i, line)
        if action == "deny":
            return DenyRule(payload, cond, line)
        return ReturnRule(payload, cond, line)
    if action == "redirect":
        return _redirect(ws, line)
    if action in ("set-header", "add-header"):
        if len(ws) < 3 or ws[2] in CONDITION_WORDS:
            raise ValueError(f"expected {action} NAME VALUE")
        value = parse_template(ws[2])
        return HeaderRule(action, _header_name(ws[1]), value, _tail(ws, 3, line), line)
    if action == "del-header":
        if len(ws) < 2 or ws[1] in CONDITION_WORDS:
            raise ValueError("expected del-header NAME")
        return HeaderRule(action, _header_name(ws[1]), None, _tail(ws, 2, line), line)
    if action == "disable-l7-retry":
        return DisableL7RetryRule(_tail(ws, 1, line), line)
    counter_rule = _counter_rule(ws, line)
    if counter_rule is not None:
        return counter_rule
    raise ValueError(_unknown("action", action, ACTIONS))


def _counter_rule(ws: list[str], line: int) -> TrackRule | IncGpc0Rule | None:
    """``track-scN SAMPLE [table NAME]`` or ``sc-inc-gpc0(N)``, then a condition; None
    for another action."""
    action = ws[0]
    m = _TRACK_RE.fullmatch(action)
    if m is not None:
        sc = sc_number(m[1], action)
        if len(ws) < 2 or ws[1] in CONDITION_WORDS:
            raise ValueError(f"{action} needs a sample to track, like {action} src")
        sample, _spec = parse_sample(ws[1], in_acl=False)
        i, table = 2, None
        if i < len(ws) and ws[i] == "table":
            table = _argument(ws, i, "a table name")
            if not NAME_RE.fullmatch(table):
                raise ValueError(f"expected a table name after table, got {table!r}")
            i += 2
        if i < len(ws) and ws[i] not in CONDITION_WORDS:
            raise ValueError(f"unexpected {ws[i]!r} (expected table NAME, if or unless)")
        return TrackRule(sc, sample, table, _tail(ws, i, line), line)
    m = _INC_GPC0_RE.fullmatch(action)
    if m is not None:
        if not m[1]:
            raise ValueError("expected sc-inc-gpc0(N), N the stick counter: 0, 1 or 2")
        return IncGpc0Rule(sc_number(m[1].strip(), "sc-inc-gpc0"), _tail(ws, 1, line), line)
    if _UNSUPPORTED_SC_ACTIONS.fullmatch(action):
        raise ValueError(f"action {action} is not supported by pylb (only sc-inc-gpc0)")
    return None


def parse_tcp_connection(text: str, line: int) -> TcpConnectionRule:
    """One ``tcp-request connection`` rule: accept, reject, track-scN or sc-inc-gpc0(N),
    then an optional condition. They run before anything is read: fetches that need the
    HTTP request are refused."""
    ws = words(text)
    if not ws:
        raise ValueError(f"expected an action ({_one_of(CONNECTION_ACTIONS)})")
    rule: TcpConnectionRule | None
    if ws[0] in ("accept", "reject"):
        rule = ConnectionRule(ws[0], _tail(ws, 1, line), line)
    else:
        rule = _counter_rule(ws, line)
    if rule is None:
        raise ValueError(_unknown("action", ws[0], CONNECTION_ACTIONS))
    for sample in rule_samples(rule):
        if sample.fetch in TLS_FETCHES:
            raise ValueError(f"{fetch_text(sample)} cannot be used in tcp-request connection "
                             "rules in pylb; use it in http-request rules")
        if sample.fetch in HTTP_FETCHES:
            raise ValueError(f"{fetch_text(sample)} needs an HTTP request, and tcp-request "
                             "connection rules run before anything is read (use src, nbsrv, "
                             "var or the sc_ and src_ fetches)")
    return rule


def parse_use_backend(text: str, line: int) -> UseBackend:
    """``NAME [if|unless cond]``; NAME may be a ``%[...]`` template resolved per request."""
    ws = words(text)
    if not ws or ws[0] in CONDITION_WORDS:
        raise ValueError("expected a backend name, then an optional condition")
    template = parse_template(ws[0])
    name = static_text(template)
    if name is not None and not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid backend name {name!r}")
    cond = _tail(ws, 1, line)
    return UseBackend(ws[0], None if name is not None else template, cond, line)


def parse_monitor_uri(text: str, line: int) -> str:
    """The URI answered by pylb itself; compared with the path when it starts with /."""
    if not text or re.search(r"[\x00-\x20\x7f]", text):
        raise ValueError(f"expected a URI like /site_alive, got {text!r}")
    return text


# -- what rules refer to, for lb.config's cross checks --------------------------------------


def condition_uses(cond: Condition | None) -> Iterator[AclUse]:
    if cond is not None:
        for group in cond.any_of:
            yield from group


def template_samples(template: Template | None) -> Iterator[Sample]:
    for part in template or ():
        if isinstance(part, Sample):
            yield part


def rule_samples(rule: HttpRequestRule | UseBackend | TcpConnectionRule) -> Iterator[Sample]:
    """Samples in a rule's values and in its anonymous ACLs."""
    if isinstance(rule, DenyRule | ReturnRule):
        for _, value in rule.payload.headers:
            yield from template_samples(value)
    elif isinstance(rule, RedirectRule):
        yield from template_samples(rule.value)
    elif isinstance(rule, HeaderRule):
        yield from template_samples(rule.value)
    elif isinstance(rule, TrackRule):
        yield rule.sample
    elif isinstance(rule, UseBackend):
        yield from template_samples(rule.dynamic)
    for use in condition_uses(rule.cond):
        if use.anonymous is not None:
            yield use.anonymous.sample


def references(sample: Sample) -> Iterator[tuple[str, str]]:
    """("backend", NAME) for nbsrv(NAME), ("map", NAME) for each map(NAME) converter,
    ("table", NAME) for the sc_ and src_ fetches that name a table."""
    if sample.fetch == "nbsrv":
        yield "backend", sample.args[0]
    elif sample.fetch in ("sc", "src_table") and sample.args[-1]:
        yield "table", sample.args[-1]
    for name, args in sample.converters:
        if name in MAP_CONVERTERS:
            yield "map", args[0]


def map_default(template: Template | None) -> str | None:
    """For ``%[...,map(NAME,DEFAULT)]`` alone: DEFAULT, the backend used on a miss."""
    if template is not None and len(template) == 1 and isinstance(template[0], Sample):
        converters = template[0].converters
        if converters and converters[-1][0] in MAP_CONVERTERS and len(converters[-1][1]) == 2:
            return converters[-1][1][1]
    return None
