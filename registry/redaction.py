"""Redaction: nothing secret leaves the service or the `registry` command.

One place hides credentials in everything the project answers, prints or logs:

- `redact_url(url)`: a URL with the password of its user info replaced by `***` (a user info
  without a password, e.g. a token used as the user name, is replaced whole), and the values of
  query parameters that carry credentials (`password`, `sentinel_password`, `token`, `sig`,
  `X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, any name holding `secret`, `key`,
  `token`, `sig`, `credential`, `auth` or `pass`) replaced by `***`.
- `redact_text(text)`: every URL inside free text redacted as above (the messages of httpx, MLflow,
  boto3 and redis-py embed the URL they failed on), then every registered secret value replaced.
- `register_secret(value)`: a value that must never appear anywhere (the admin token, the webhook
  secret, the signing key, the passwords of the configured URLs, the AWS keys). Settings register
  theirs when they are read (`RegistrySettings`), so a secret is hidden even in text that does
  not look like a URL (values of 8 characters or more: shorter ones are hidden only inside URLs).
- `redact(obj)`: a JSON-like answer (dicts, lists, strings) with every string redacted.
- `RedactingFilter`: a logging filter that redacts a record's message, its exception text and its
  stack; `install_log_redaction()` puts it on the project's loggers and on every handler of the
  process (BentoML's, uvicorn's, the root logger's), text and JSON lines alike.
- `RedactingStream`: a text stream that redacts what is written through it (the `registry`
  command's stdout and the stderr MLflow's prints go to).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Iterable, Mapping, Optional, TextIO
from urllib.parse import quote, unquote

MASK = "***"

#: A URL inside text: a scheme, `://`, then everything up to white space or a quote/bracket that ends it.
_URL_RE = re.compile(r"""(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]{0,30}://)([^\s'"<>`\\]*)""")
#: Query parameter names whose values are credentials (presigned URLs, tokens, passwords).
_SECRET_PARAM_RE = re.compile(r"pass|pwd|secret|token|key|sig|credential|auth|session", re.IGNORECASE)
#: Shortest value kept in the literal secret list: shorter values would hide ordinary words (a password
#: `mlflow` would turn every layer name into `***`); they are hidden only where they sit in a URL.
MIN_SECRET_CHARS = 8
#: Environment variables that hold credentials of the stack (read by boto3 and MLflow themselves).
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH")
#: Environment variables that hold URLs whose user info or query may carry credentials.
URL_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3")

_LOCK = threading.Lock()
_SECRETS: set[str] = set()
_SECRETS_RE: Optional[re.Pattern[str]] = None


def _netloc(netloc: str) -> str:
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _ = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}@{hosts}"
    return f"{MASK}@{hosts}" if userinfo else netloc


def _query(query: str) -> str:
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}={MASK}" if eq and _SECRET_PARAM_RE.search(unquote(name)) else part)
    return "&".join(parts)


def _rest(rest: str) -> str:
    """What follows `scheme://`: user info and credential query values hidden."""
    cut = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if i != -1:
            cut = min(cut, i)
    netloc, tail = rest[:cut], rest[cut:]
    out = _netloc(netloc)
    if "?" in tail:
        path, _, query = tail.partition("?")
        query, hash_, fragment = query.partition("#")
        tail = f"{path}?{_query(query)}{hash_}{fragment}"
    return out + tail


def _literal(text: str) -> str:
    pattern = _SECRETS_RE
    return text if pattern is None else pattern.sub(MASK, text)


def redact_url(url: Optional[str]) -> Optional[str]:
    """The URL with its credentials replaced by `***`; a value that is not a URL is returned as it is
    (with registered secrets hidden)."""
    if url is None:
        return None
    return redact_text(url)


def redact_text(text: str) -> str:
    """Free text with every URL in it redacted and every registered secret replaced by `***`."""
    if not isinstance(text, str):
        text = str(text)
    if "://" in text:
        text = _URL_RE.sub(lambda m: m.group(1) + _rest(m.group(2)), text)
    return _literal(text)


def redact(value: Any) -> Any:
    """A JSON-like value (dicts, lists, tuples, strings) with every string redacted; keys too."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def redact_in_place(value: Any) -> Any:
    """Like `redact`, but rewrites the dicts and lists it is given (for data other code still refers to)."""
    if isinstance(value, dict):
        for key in list(value):
            value[key] = redact_in_place(value[key]) if isinstance(value[key], (dict, list)) else redact(value[key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = redact_in_place(item) if isinstance(item, (dict, list)) else redact(item)
    return value


# -- secret values -------------------------------------------------------------------------------
def _forms(value: str) -> Iterable[str]:
    yield value
    yield quote(value, safe="")
    yield unquote(value)


def register_secret(value: Any) -> None:
    """Hide this value wherever it appears from now on (a SecretStr, a str, or None for nothing)."""
    if value is None:
        return
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    value = str(value)
    global _SECRETS_RE
    with _LOCK:
        new = {form for form in _forms(value) if len(form) >= MIN_SECRET_CHARS and form != MASK} - _SECRETS
        if not new:
            return
        _SECRETS.update(new)
        # longest first, so a secret that contains another is hidden whole
        _SECRETS_RE = re.compile("|".join(re.escape(s) for s in sorted(_SECRETS, key=len, reverse=True)))


def url_secrets(url: Optional[str]) -> list[str]:
    """The credentials a URL holds: its user info's password (or a lone user info) and credential query values."""
    if not url or "://" not in url:
        return []
    rest = url.split("://", 1)[1]
    out = []
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = netloc.rpartition("@")
    if at and userinfo:
        user, colon, password = userinfo.partition(":")
        out.append(password if colon else user)
    if "?" in rest:
        query = rest.split("?", 1)[1].split("#", 1)[0]
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            if eq and value and _SECRET_PARAM_RE.search(unquote(name)):
                out.append(value)
    return [s for s in out if s]


def register_url(url: Optional[str]) -> None:
    for secret in url_secrets(url):
        register_secret(secret)


def register_environment(environ: Optional[Mapping[str, str]] = None) -> None:
    """The stack's own credential variables (AWS keys, MLflow's password and token, URLs holding passwords)."""
    variables: Mapping[str, str] = os.environ if environ is None else environ
    for name in SECRET_VARIABLES:
        register_secret(variables.get(name) or None)
    for name in URL_VARIABLES:
        register_url(variables.get(name))


# -- logs ----------------------------------------------------------------------------------------
class RedactingFilter(logging.Filter):
    """Redacts a log record in place: its message (arguments merged in), exception text and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's problem, not a secret
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        record._redacted = True
        return True


_FILTER = RedactingFilter()


def _add_filter(target: logging.Filterer) -> None:
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(_FILTER)


def install_log_redaction(loggers: Iterable[str] = ()) -> None:
    """Put the redacting filter on the named loggers (records made there) and on every handler of the
    process (records that propagate from any library's logger). Call again after handlers change."""
    for name in loggers:
        _add_filter(logging.getLogger(name))
    seen: set[int] = set()
    candidates = [logging.getLogger()] + [x for x in list(logging.Logger.manager.loggerDict.values()) if isinstance(x, logging.Logger)]
    for logger in candidates:
        for handler in list(logger.handlers):
            if id(handler) not in seen:
                seen.add(id(handler))
                _add_filter(handler)


# -- streams -------------------------------------------------------------------------------------
class RedactingStream:
    """A text stream that redacts every write, for output the project does not format itself."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


__all__ = ["MASK", "redact", "redact_in_place", "redact_text", "redact_url", "register_secret", "register_url",
           "register_environment", "url_secrets", "RedactingFilter", "RedactingStream", "install_log_redaction"]
