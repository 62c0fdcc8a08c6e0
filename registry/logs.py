"""The plugin's logs: the design's tags (`[HYBRID]`, `[CACHE]`, `[MLFLOW]`, `[FALLBACK]`) in every
layer's lines, as plain text (default) or one JSON object per line (`REGISTRY_LOG_FORMAT=json`).

Every record of this project carries, as attributes any format can use, `tag` (the seed's tag of
its message: `HYBRID`, `CACHE`, `MLFLOW`, `FALLBACK`), `layer` (the registry layer it is about:
`redis`, `training_api`, `mlflow`, `file`, `huggingface`, or None for the chain as a whole),
`model` and `version`; `RecordFields` sets them. The tag stays in the text as well. `layer`,
`model` and `version` come from the `extra=` of the call (`log_fields(...)`); without one, the
layer is the one the logger's module is (`registry.sources.file_backup` is `file`) or the one
the tag names (`[CACHE]` is `redis`, `[MLFLOW]` is `mlflow`).

A JSON line carries `time`, `level`, `logger`, `tag`, `layer`, `model`, `version` and `message`
(the text without its tag), null where the line is about none.

Something that keeps failing (a layer, the model loader, a background loop) logs through
`FailureLog`: one WARNING when it starts failing, naming what and why; one INFO when it recovers;
the attempts in between at DEBUG.

Every line, text or JSON, of this project or of a library, goes through `registry.redaction`'s
filter first: credentials in URLs and the configured secrets never reach a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import datetime, timezone
from typing import Any, Optional

from registry.redaction import RedactingFilter, install_log_redaction

#: The loggers of this project; BentoML's own handlers pass WARNING and up from other loggers.
LOGGERS = ("service", "registry", "runners", "serving", "training")
_TAG_RE = re.compile(r"^\[(HYBRID|CACHE|MLFLOW|FALLBACK)\]\s*")


#: The layer a module's records are about, when the call does not say.
_MODULE_LAYERS = {
    "registry.sources.redis_cache": "redis", "registry.sources.training_api": "training_api",
    "registry.sources.mlflow_registry": "mlflow", "registry.sources.file_backup": "file",
    "registry.sources.huggingface": "huggingface",
}
#: The layer a tag names, when neither the call nor the module says (`[HYBRID]` is the chain: none).
_TAG_LAYERS = {"CACHE": "redis", "MLFLOW": "mlflow", "FALLBACK": "huggingface"}


def log_fields(model: Optional[str] = None, version: Optional[str] = None, layer: Optional[str] = None) -> dict[str, Any]:
    """`extra=` for a log call: the model, version and layer the line is about."""
    return {"registry_fields": {"model": model, "version": version, "layer": layer}}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The tag, layer, model and version of a record (see the module docstring), set on it once."""
    if not hasattr(record, "layer"):
        fields = getattr(record, "registry_fields", None) or {}
        try:
            match = _TAG_RE.match(record.getMessage())
        except Exception:  # noqa: BLE001 - a broken format string is logging's problem
            match = None
        tag = match.group(1) if match else None
        record.tag = tag
        record.layer = fields.get("layer") or _MODULE_LAYERS.get(record.name) or _TAG_LAYERS.get(tag or "")
        record.model = fields.get("model")
        record.version = fields.get("version")
    return {"tag": record.tag, "layer": record.layer, "model": record.model, "version": record.version}  # type: ignore[attr-defined]


class RecordFields(logging.Filter):
    """Sets `tag`, `layer`, `model` and `version` on every record it sees (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record_fields(record)
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        match = _TAG_RE.match(message)
        fields = record_fields(record)
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "tag": fields["tag"],
            "layer": fields["layer"],
            "model": fields["model"],
            "version": fields["version"],
            "message": message[match.end():] if match else message,
        }
        if record.exc_info or record.exc_text:
            # the redacting filter leaves the (redacted) traceback in exc_text
            body["exception"] = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        return json.dumps(body, ensure_ascii=False, default=str)


class FailureLog:
    """Log something that keeps failing once: a WARNING when it starts failing (what, and why), an
    INFO when it recovers, DEBUG for every attempt in between, whatever their causes say."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._failing: dict[str, str] = {}
        self._lock = threading.Lock()

    def failed(self, key: str, cause: str, message: str, *args: Any, exc_info: Any = None, extra: Optional[dict] = None) -> bool:
        """Log `message % args` for `key` failing with `cause`; True when this is the start of the failure."""
        with self._lock:
            first = key not in self._failing
            self._failing[key] = cause
        self.logger.log(logging.WARNING if first else logging.DEBUG, message, *args, exc_info=exc_info if first else None, extra=extra)
        return first

    def recovered(self, key: str, message: str, *args: Any, extra: Optional[dict] = None) -> bool:
        """Log `message % args` and the last cause (`(was: ...)`) at INFO when `key` was failing; True then."""
        with self._lock:
            was = self._failing.pop(key, None)
        if was is None:
            return False
        self.logger.info(message + " (was: %s)", *args, was, extra=extra)
        return True

    def failing(self, key: str) -> Optional[str]:
        """The last cause of `key`'s failure, None while it works."""
        with self._lock:
            return self._failing.get(key)


def configure_logging(level: str, log_format: str) -> None:
    """Set this project's loggers to `level`; with `json`, they write JSON lines to stderr themselves."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in [h for h in logger.handlers if getattr(h, "_registry_json", False)]:
            logger.removeHandler(handler)
        if log_format == "json":
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(JSONFormatter())
            handler.addFilter(RedactingFilter())
            handler.addFilter(RecordFields())
            handler._registry_json = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False
        else:
            logger.propagate = True
    # BentoML's and uvicorn's handlers (set up before the service starts) and every library's records.
    install_log_redaction(LOGGERS)
    install_record_fields()


def install_record_fields() -> None:
    """`RecordFields` on every handler of the process, so any format may name `%(layer)s` or `%(tag)s`."""
    loggers = [logging.getLogger()] + [x for x in list(logging.Logger.manager.loggerDict.values()) if isinstance(x, logging.Logger)]
    for handler in {id(h): h for logger in loggers for h in logger.handlers}.values():
        if not any(isinstance(f, RecordFields) for f in handler.filters):
            handler.addFilter(RecordFields())
