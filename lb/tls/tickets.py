"""TLS session ticket keys shared by many SSLContexts, in one process or many.

A session saved by a client resumes on any worker of any generation only if every server
SSL_CTX encrypts and decrypts tickets (TLS 1.2 and 1.3) with the same keys. Python's ``ssl``
has no API for that: each SSL_CTX makes its own random keys. So this module installs OpenSSL
3's ticket key callback, ``SSL_CTX_set_tlsext_ticket_key_evp_cb``, with ctypes. Symbols are
looked up through the handle of Python's own ``_ssl`` extension, so dlsym finds the
libssl/libcrypto that ``_ssl`` is linked to (checked: ``OpenSSL_version_num()`` equals
``ssl.OPENSSL_VERSION_NUMBER``).

The ``SSL_CTX *`` of an ``ssl.SSLContext`` is the first field after PyObject_HEAD in
CPython's PySSLContext: it is read at ``id(ctx) + object.__basicsize__`` and used only if it
looks like a pointer, ``SSL_CTX_get_options()`` on it equals ``ctx.options``, and a harmless
option bit (SSL_OP_TLSEXT_PADDING: it only pads a client's ClientHello) flipped through
Python reads back flipped through C. Otherwise TicketKeysUnavailable, never a crash.

A key is laid out like an entry of HAProxy's tls-ticket-keys file: name[16] aes_key[32]
hmac_key[32]. Tickets are OpenSSL's format: AES-256-CBC, HMAC-SHA256, the IV from RAND_bytes.
"""

from __future__ import annotations

import ctypes
import os
import ssl
import sys
from collections.abc import Sequence
from ctypes import c_char_p, c_int, c_size_t, c_uint, c_uint64, c_ulong, c_void_p

KEY_SIZE = 80  # name[16] aes_key[32] hmac_key[32], as HAProxy's 80-byte tls-ticket-keys
NAME_SIZE = 16
_AES = slice(16, 48)
_HMAC = slice(48, 80)
_IV_SIZE = 16  # AES-256-CBC; OpenSSL's buffer is EVP_MAX_IV_LENGTH (16)
_OP_PROBE = 0x10  # SSL_OP_TLSEXT_PADDING
_U64 = (1 << 64) - 1
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5


class TicketKeysUnavailable(Exception):
    """Shared ticket keys cannot be installed with this Python/OpenSSL (the reason is the
    message)."""


def new_key() -> bytes:
    """A new random ticket key of KEY_SIZE bytes."""
    return os.urandom(KEY_SIZE)


class _Param(ctypes.Structure):
    """OSSL_PARAM."""

    _fields_ = [("key", c_char_p), ("data_type", c_uint), ("data", c_void_p),
                ("data_size", c_size_t), ("return_size", c_size_t)]


# int cb(SSL *s, unsigned char key_name[16], unsigned char *iv, EVP_CIPHER_CTX *ctx,
#        EVP_MAC_CTX *hctx, int enc)
_Callback = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int)


class _Lib:
    """The OpenSSL functions used, from the libssl/libcrypto that ``_ssl`` uses."""

    def __init__(self) -> None:
        if sys.implementation.name != "cpython":
            raise TicketKeysUnavailable(f"needs CPython, not {sys.implementation.name}")
        import _ssl

        try:
            dll = ctypes.CDLL(_ssl.__file__)
        except (OSError, AttributeError) as e:
            raise TicketKeysUnavailable(f"cannot open the _ssl extension: {e}") from e

        def fn(name: str, restype: type | None, *argtypes: type) -> ctypes._CFuncPtr:
            try:
                f = getattr(dll, name)
            except AttributeError:
                raise TicketKeysUnavailable(
                    f"{ssl.OPENSSL_VERSION}: no {name} (OpenSSL 3.0 or later needed)") from None
            f.restype, f.argtypes = restype, argtypes
            return f

        version = fn("OpenSSL_version_num", c_ulong)()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise TicketKeysUnavailable(f"libssl found through _ssl is {version:#x}, "
                                        f"not {ssl.OPENSSL_VERSION_NUMBER:#x}")
        self.get_options = fn("SSL_CTX_get_options", c_uint64, c_void_p)
        self.set_cb = fn("SSL_CTX_set_tlsext_ticket_key_evp_cb", c_int, c_void_p, _Callback)
        self.rand_bytes = fn("RAND_bytes", c_int, c_void_p, c_int)
        self.encrypt_init = fn("EVP_EncryptInit_ex", c_int,
                               c_void_p, c_void_p, c_void_p, c_char_p, c_void_p)
        self.decrypt_init = fn("EVP_DecryptInit_ex", c_int,
                               c_void_p, c_void_p, c_void_p, c_char_p, c_void_p)
        self.mac_set_params = fn("EVP_MAC_CTX_set_params", c_int, c_void_p, ctypes.POINTER(_Param))
        self.set_ciphersuites = fn("SSL_CTX_set_ciphersuites", c_int, c_void_p, c_char_p)
        self.aes_256_cbc = fn("EVP_aes_256_cbc", c_void_p)()
        if not self.aes_256_cbc:
            raise TicketKeysUnavailable("EVP_aes_256_cbc() is NULL")

    def ssl_ctx(self, ctx: ssl.SSLContext) -> int:
        """The validated ``SSL_CTX *`` of ``ctx``."""
        if not isinstance(ctx, ssl.SSLContext):
            raise TypeError(f"not an ssl.SSLContext: {type(ctx).__name__}")
        ptr = c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or ptr < 0x10000 or ptr % 8:
            raise TicketKeysUnavailable(f"no SSL_CTX pointer in {sys.version.split()[0]}'s "
                                        "SSLContext layout")
        before = int(ctx.options) & _U64
        if self.get_options(ptr) != before:
            raise TicketKeysUnavailable("SSL_CTX pointer check failed (options differ)")
        try:
            ctx.options = before ^ _OP_PROBE
            flipped = self.get_options(ptr)
        finally:
            ctx.options = before
        if flipped != before ^ _OP_PROBE or self.get_options(ptr) != before:
            raise TicketKeysUnavailable("SSL_CTX pointer check failed (option not seen)")
        return ptr


_lib_cache: _Lib | TicketKeysUnavailable | None = None


def _lib() -> _Lib:
    global _lib_cache
    if _lib_cache is None:
        try:
            _lib_cache = _Lib()
        except TicketKeysUnavailable as e:
            _lib_cache = e
    if isinstance(_lib_cache, TicketKeysUnavailable):
        raise TicketKeysUnavailable(*_lib_cache.args)
    return _lib_cache


_unavailable: str | None = None


def unavailable() -> str:
    """"" when shared ticket keys work in this Python/OpenSSL, else why not (one line)."""
    global _unavailable
    if _unavailable is None:
        try:
            TicketKeys([new_key()]).install(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            _unavailable = ""
        except (TicketKeysUnavailable, ssl.SSLError, OSError) as e:
            _unavailable = str(e) or type(e).__name__
    return _unavailable


class _Key:
    """One key, ready for the callback: its OSSL_PARAMs (HMAC key, digest) are built once."""

    __slots__ = ("name", "aes", "params", "_buffers")

    def __init__(self, key: bytes) -> None:
        self.name = key[:NAME_SIZE]
        self.aes = key[_AES]
        hmac = ctypes.create_string_buffer(key[_HMAC], len(key[_HMAC]))
        digest = ctypes.create_string_buffer(b"SHA256")
        self._buffers = (hmac, digest)  # the params point into them
        self.params = (_Param * 3)(
            _Param(b"key", _OSSL_PARAM_OCTET_STRING, ctypes.addressof(hmac), len(hmac), 0),
            _Param(b"digest", _OSSL_PARAM_UTF8_STRING, ctypes.addressof(digest), 6, 0),
            _Param(None, 0, None, 0, 0),
        )


_State = tuple[_Key | None, dict[bytes, _Key]]  # (the key that encrypts, every key by name)


def _make_callback(lib: _Lib, box: list[_State]) -> ctypes._CFuncPtr:
    """The ticket key callback, reading the keys from ``box[0]`` (swapped whole by set()).

    It runs in the thread doing the handshake, which Python made release the GIL around
    SSL_do_handshake/SSL_read/SSL_write: ctypes takes the GIL back for the call. It never
    fails a handshake: no key or any error means no ticket / a full handshake (return 0).
    Cost (OpenSSL 3.0.19, CPython 3.11, x86_64, called through its C pointer): about 4 us
    to issue a ticket, 3 us to decrypt one, 1 us for an unknown name; a resumed handshake
    costs 0.2-0.4 ms of CPU, a full one 0.5 ms.
    """
    rand_bytes, encrypt_init, decrypt_init = lib.rand_bytes, lib.encrypt_init, lib.decrypt_init
    mac_set_params, aes, string_at, memmove = (lib.mac_set_params, lib.aes_256_cbc,
                                               ctypes.string_at, ctypes.memmove)

    def callback(_ssl: int | None, name: int, iv: int, cipher_ctx: int, mac_ctx: int,
                 enc: int) -> int:
        try:
            current, by_name = box[0]
            if enc:
                if (current is None or rand_bytes(iv, _IV_SIZE) != 1
                        or encrypt_init(cipher_ctx, aes, None, current.aes, iv) != 1
                        or mac_set_params(mac_ctx, current.params) != 1):
                    return 0
                memmove(name, current.name, NAME_SIZE)
                return 1
            key = by_name.get(string_at(name, NAME_SIZE))
            if (key is None or mac_set_params(mac_ctx, key.params) != 1
                    or decrypt_init(cipher_ctx, aes, None, key.aes, iv) != 1):
                return 0
            return 1 if key is current else 2  # 2: renew, the client moves to keys[0]
        except Exception:
            return 0

    return _Callback(callback)


class TicketKeys:
    """Ticket keys shared by every SSLContext they are installed on.

    ``keys[0]`` encrypts new tickets, every key decrypts; a ticket decrypted with another
    key than ``keys[0]`` is renewed, one with an unknown name makes a full handshake.
    Installed contexts keep this object (and the C callback) alive.
    """

    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        self._box: list[_State] = [(None, {})]
        self._keys: tuple[bytes, ...] = ()
        self._callback: ctypes._CFuncPtr | None = None
        self.set(keys)

    def set(self, keys: Sequence[bytes]) -> None:
        """Use ``keys`` from the next handshake on, on every context installed with."""
        if isinstance(keys, (bytes, bytearray, memoryview, str)):
            raise TypeError("keys is a sequence of keys, not one key")
        checked: list[bytes] = []
        for i, key in enumerate(keys):
            if not isinstance(key, (bytes, bytearray, memoryview)):
                raise TypeError(f"ticket key {i} is a {type(key).__name__}, not bytes")
            key = bytes(key)
            if len(key) != KEY_SIZE:
                raise ValueError(f"ticket key {i} has {len(key)} bytes, not {KEY_SIZE}")
            checked.append(key)
        parsed = [_Key(key) for key in checked]
        by_name: dict[bytes, _Key] = {}
        for key in parsed:
            by_name.setdefault(key.name, key)  # the first key with a name wins
        self._keys = tuple(checked)
        self._box[0] = (by_name[parsed[0].name] if parsed else None, by_name)

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    def install(self, ctx: ssl.SSLContext) -> None:
        """Make ``ctx`` encrypt and decrypt session tickets with these keys.

        Raises TypeError if ``ctx`` is not an ssl.SSLContext, TicketKeysUnavailable if this
        Python/OpenSSL does not allow it (see unavailable()).
        """
        lib = _lib()
        ptr = lib.ssl_ctx(ctx)
        if self._callback is None:
            self._callback = _make_callback(lib, self._box)
        try:
            ctx._lb_ticket_keys = self  # type: ignore[attr-defined]  # keeps the callback alive
        except AttributeError:
            _pinned.append(self)
        if lib.set_cb(ptr, self._callback) != 1:
            raise TicketKeysUnavailable("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")


_pinned: list[TicketKeys] = []  # installed on contexts that have no __dict__: kept for good


def set_ciphersuites(ctx: ssl.SSLContext, suites: str) -> None:
    """The TLS 1.3 cipher suites of ``ctx`` (Python's ssl sets only the TLS 1.2 list),
    through the same validated ``SSL_CTX *``. Raises TicketKeysUnavailable where it cannot
    be reached, ValueError for a list OpenSSL refuses."""
    lib = _lib()
    if lib.set_ciphersuites(lib.ssl_ctx(ctx), suites.encode("ascii")) != 1:
        raise ValueError(f"OpenSSL refused the TLS 1.3 cipher suites {suites!r}")
