"""Redis clients built from `REGISTRY_REDIS_URL`, and the framing of cached values.

Two kinds of URL:

- `redis://[[user]:password@]host[:port][/db]` or `rediss://…` (TLS): one server, redis-py's own URL.
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service_name[/db][?options]`:
  a master watched by Redis Sentinel. The hosts are the sentinels (port 26379 when left out);
  the client asks them which server is the master of `service_name` and asks again when that
  server goes away or turns into a replica, so a failover needs no restart. The password in the
  URL is the master's. `rediss+sentinel://` speaks TLS to the master. Options:
  `sentinel_password`, `sentinel_username` (when the sentinels have their own `requirepass`),
  `sentinel_ssl=true` (TLS to the sentinels too), and for TLS `ssl_ca_certs`, `ssl_cert_reqs`
  (`none`, `optional`, `required`), `ssl_check_hostname`.

A URL that cannot be used raises SettingsError naming REGISTRY_REDIS_URL (password hidden).

Cached values are the payload's JSON text, or, above `REGISTRY_CACHE_COMPRESS_ABOVE` bytes, that
text gzip'ed. gzip's magic (`1f 8b`) can never begin JSON text, so a reader tells the two apart by
the first two bytes whatever its own setting, and values written before compression existed
still read.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from registry.errors import PayloadError, SettingsError
from registry.redaction import redact_url

VARIABLE = "REGISTRY_REDIS_URL"
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
DEFAULT_SENTINEL_PORT = 26379
RETRY_ON = [redis.ConnectionError, redis.TimeoutError]
HEALTH_CHECK_INTERVAL = 30

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SSL_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_check_hostname")
_OPTIONS = ("sentinel_password", "sentinel_username", "sentinel_ssl", *_SSL_OPTIONS)


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


@dataclass(frozen=True)
class SentinelURL:
    """What a `redis+sentinel://` URL says."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    ssl: bool = False
    sentinel_username: Optional[str] = None
    sentinel_password: Optional[str] = field(default=None, repr=False)
    sentinel_ssl: bool = False
    ssl_options: dict[str, Any] = field(default_factory=dict)


def _bool(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"option {name}={value!r} is not a boolean (true/false)")


def _host_port(text: str) -> tuple[str, int]:
    text = text.strip()
    if not text:
        raise ValueError("an empty sentinel address (two commas in a row, or a trailing comma)")
    if text.startswith("["):  # [IPv6]:port
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"sentinel address {text!r} is not [IPv6]:port")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if not host or ":" in port_text:
            raise ValueError(f"sentinel address {text!r} is not host:port")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"sentinel address {text!r} has no valid port")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a `redis+sentinel://` URL; raises SettingsError naming REGISTRY_REDIS_URL."""
    try:
        return _parse_sentinel_url(url)
    except ValueError as exc:
        raise SettingsError(VARIABLE, redact_url(url), str(exc)) from None


def _parse_sentinel_url(url: str) -> SentinelURL:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    if parts.fragment:
        raise ValueError("a sentinel URL has no '#fragment' (percent-encode '#' in a password)")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    if not hosts:
        raise ValueError("no sentinel address: redis+sentinel://host:26379[,host:26380…]/service_name[/db]")
    sentinels = tuple(_host_port(h) for h in hosts.split(","))
    segments = parts.path.split("/")[1:] if parts.path else []
    if segments and segments[-1] == "":
        segments = segments[:-1]  # a trailing slash
    if not segments or not segments[0]:
        raise ValueError("no service name: redis+sentinel://host:26379,…/service_name[/db]")
    if len(segments) > 2:
        raise ValueError(f"path {parts.path!r} has more than /service_name/db")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"database {segments[1]!r} is not a number")
        db = int(segments[1])
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _OPTIONS:
            raise ValueError(f"unknown option {name!r}; known: {', '.join(_OPTIONS)}")
        options[name] = value
    ssl = SENTINEL_SCHEMES[scheme]
    sentinel_ssl = _bool("sentinel_ssl", options["sentinel_ssl"]) if "sentinel_ssl" in options else False
    ssl_options: dict[str, Any] = {}
    for name in _SSL_OPTIONS:
        if name in options:
            if not (ssl or sentinel_ssl):
                raise ValueError(f"option {name} needs TLS (rediss+sentinel:// or sentinel_ssl=true)")
            if name == "ssl_check_hostname":
                ssl_options[name] = _bool(name, options[name])
            elif name == "ssl_cert_reqs" and options[name] not in ("none", "optional", "required"):
                raise ValueError("ssl_cert_reqs must be none, optional or required")
            else:
                ssl_options[name] = options[name]
    return SentinelURL(sentinels=sentinels, service_name=unquote(segments[0]), db=db, username=username, password=password,
                       ssl=ssl, sentinel_username=options.get("sentinel_username") or None,
                       sentinel_password=options.get("sentinel_password") or None, sentinel_ssl=sentinel_ssl,
                       ssl_options=ssl_options)


class SentinelMasterRedis(redis.Redis):
    """The master's client; closing it also closes the connections to the sentinels."""

    sentinel: Optional[Sentinel] = None  # type: ignore[assignment]  # redis-py's own `sentinel` command, shadowed on purpose

    def close(self) -> None:
        super().close()
        if self.sentinel is not None:
            self.sentinel.close()


def redis_from_url(url: str, *, timeout: float, retry: Retry) -> redis.Redis:
    """A pooled client for `REGISTRY_REDIS_URL` (a server, or a Sentinel-managed master).

    `timeout` bounds every connect and command (to the sentinels too); `retry` is redis-py's
    retry of a command that met a connection error or a timeout. Through Sentinel a retried
    command asks the sentinels for the master again, so a command that fails during a failover
    goes to the new master once the sentinels name it.
    """
    if not is_sentinel_url(url):
        try:
            return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry,
                                        retry_on_error=list(RETRY_ON), health_check_interval=HEALTH_CHECK_INTERVAL)
        except ValueError as exc:
            raise SettingsError(VARIABLE, redact_url(url), str(exc)) from None
    spec = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout, "socket_connect_timeout": timeout,
        # The sentinels are asked in turn: one that does not answer is passed over, not retried.
        "retry": Retry(NoBackoff(), 0),
        "username": spec.sentinel_username, "password": spec.sentinel_password,
    }
    if spec.sentinel_ssl:
        sentinel_kwargs.update(ssl=True, **spec.ssl_options)
    sentinel = Sentinel(list(spec.sentinels), socket_timeout=timeout, sentinel_kwargs=sentinel_kwargs)
    master_kwargs: dict[str, Any] = dict(spec.ssl_options) if spec.ssl else {}
    client = sentinel.master_for(
        spec.service_name, redis_class=SentinelMasterRedis, db=spec.db, username=spec.username, password=spec.password,
        socket_timeout=timeout, socket_connect_timeout=timeout, retry=retry, retry_on_error=list(RETRY_ON),
        health_check_interval=HEALTH_CHECK_INTERVAL, ssl=spec.ssl, **master_kwargs,
    )
    client.sentinel = sentinel
    return client


# -- cached values -------------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
#: Most bytes a compressed value may inflate to: a registry payload is far smaller; a value that
#: inflates further is refused before it is held in memory (a gzip bomb in a shared cache).
MAX_INFLATED_BYTES = 64 * 1024 * 1024


def pack_value(text: str, compress_above: int = 0) -> bytes | str:
    """What to store for the payload text: gzip'ed when `compress_above` > 0 and the text is larger."""
    if compress_above <= 0:
        return text
    data = text.encode("utf-8")
    if len(data) <= compress_above:
        return text
    return gzip.compress(data, compresslevel=6, mtime=0)


def is_compressed(raw: bytes | str) -> bool:
    return isinstance(raw, (bytes, bytearray, memoryview)) and bytes(raw[:2]) == GZIP_MAGIC


def unpack_value(raw: bytes, where: str) -> bytes:
    """The payload text of a stored value, compressed or not; raises PayloadError for a broken one."""
    if not is_compressed(raw):
        return raw
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # the gzip container
    try:
        data = inflater.decompress(bytes(raw), MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise PayloadError(where, f"compressed value cannot be read: {exc}") from None
    if inflater.unconsumed_tail:
        raise PayloadError(where, f"compressed value inflates beyond {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise PayloadError(where, "compressed value is truncated")
    if inflater.unused_data:
        raise PayloadError(where, "compressed value has bytes after its end")
    return data
