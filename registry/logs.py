"""The plugin's logs: the design's tags (`[HYBRID]`, `[CACHE]`, `[MLFLOW]`, `[FALLBACK]`) in every
layer's lines, as plain text (default) or one JSON object per line (`REGISTRY_LOG_FORMAT=json`).

A JSON line carries `time`, `level`, `logger`, `tag`, `model`, `version`, `layer` and `message`
(the text without its tag); `model`, `version` and `layer` come from the `extra=` of the call
(`log_fields(...)`), null when the line is about none.

Every line, text or JSON, of this project or of a library, goes through `registry.redaction`'s
filter first: credentials in URLs and the configured secrets never reach a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any, Optional

from registry.redaction import RedactingFilter, install_log_redaction

#: The loggers of this project; BentoML's own handlers pass WARNING and up from other loggers.
LOGGERS = ("service", "registry", "runners", "training")
_TAG_RE = re.compile(r"^\[(HYBRID|CACHE|MLFLOW|FALLBACK)\]\s*")


def log_fields(model: Optional[str] = None, version: Optional[str] = None, layer: Optional[str] = None) -> dict[str, Any]:
    """`extra=` for a log call: the model, version and layer the line is about."""
    return {"registry_fields": {"model": model, "version": version, "layer": layer}}


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        match = _TAG_RE.match(message)
        fields = getattr(record, "registry_fields", None) or {}
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "tag": match.group(1) if match else None,
            "model": fields.get("model"),
            "version": fields.get("version"),
            "layer": fields.get("layer"),
            "message": message[match.end():] if match else message,
        }
        if record.exc_info or record.exc_text:
            # the redacting filter leaves the (redacted) traceback in exc_text
            body["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False, default=str)


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
            handler._registry_json = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False
        else:
            logger.propagate = True
    # BentoML's and uvicorn's handlers (set up before the service starts) and every library's records.
    install_log_redaction(LOGGERS)
