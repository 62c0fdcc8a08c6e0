"""Every error the project raises, under one root.

Callers branch on the type, never on the message; messages are built from the constructor
arguments so that each one names what went wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from registry.redaction import redact_text

if TYPE_CHECKING:
    from registry.trail import LayerAttempt


def safe_repr(value: object, limit: int = 80) -> str:
    """A short repr for messages; never fails (huge integers cannot be turned into text)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit] + "..."


class RegistryError(Exception):
    """Root of every error raised by this project.

    `status` is the HTTP status an answer about this error carries (`serving.admin.error_response`
    is the one place that turns an error into an answer); the default, 500, means "our fault".
    """

    status: int = 500


class SettingsError(RegistryError):
    """A configuration variable holds a value that cannot be used (the service's configuration: 500)."""

    status = 500

    def __init__(self, variable: str, value: object, reason: str):
        self.variable = variable
        self.value = value
        super().__init__(f"{variable}={safe_repr(value)}: {reason}")


class SelectorError(RegistryError, ValueError):
    """A selector (`latest`, `best`, an alias or a version) is malformed."""

    status = 400

    def __init__(self, selector: object, reason: str):
        self.selector = selector
        super().__init__(f"invalid selector {safe_repr(selector)}: {reason}")


class PayloadError(RegistryError, ValueError):
    """Registry data (cache value, API body, backup file) has the wrong shape."""

    status = 502

    def __init__(self, where: str, reason: str):
        self.where = where = redact_text(where)
        super().__init__(f"{where}: {redact_text(reason)}")


class SourceUnavailable(RegistryError):
    """A layer could not be asked: down, timed out, or answered with an error status."""

    status = 503

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason = redact_text(reason)  # client errors embed the URL they failed on
        super().__init__(f"{source} unavailable: {reason}")


class SourceRejected(RegistryError):
    """A layer answered, but what it holds is unusable (garbage, wrong shape, bad signature)."""

    status = 502

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason = redact_text(reason)
        super().__init__(f"{source} rejected: {reason}")


class ModelNotResolvable(RegistryError):
    """No layer of the chain could say which version of a model to serve."""

    status = 404

    def __init__(self, name: str, selector: str, trail: Sequence["LayerAttempt"]):
        self.name = name
        self.selector = selector
        self.trail = list(trail)
        layers = redact_text("; ".join(f"{a.source}: {a.outcome}" + (f" ({a.detail})" if a.detail else "") for a in trail))
        super().__init__(f"no version of model {name!r} for selector {selector!r} could be resolved [{layers or 'no layer configured'}]")


class PublishError(RegistryError):
    """Publishing a trained model into the registry failed."""


class ArtifactError(RegistryError):
    """A model artifact could not be fetched, verified or loaded."""

    status = 422

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason = redact_text(reason)
        super().__init__(f"artifact {redact_text(uri)}: {reason}")


class UnknownModel(RegistryError):
    """A request named a model this service is not configured to serve."""

    status = 404

    def __init__(self, name: str, known: Sequence[str]):
        self.name = name
        super().__init__(f"unknown model {name!r}; this service serves {', '.join(repr(k) for k in known) or 'no model'}")


class ModelNotLoaded(RegistryError):
    """A configured model has no version loaded yet (resolution or loading failed)."""

    status = 503

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"model {name!r} is not loaded: {reason}")


class ReloadFailed(RegistryError):
    """A reload could not resolve, load or warm up the new version; the old one keeps serving."""

    @property
    def status(self) -> int:  # type: ignore[override]
        """404 when nothing resolved (no such version or alias), 422 when the version did not load."""
        return 404 if isinstance(self.__cause__, ModelNotResolvable) else 422

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"reload of {name!r} failed, the previous version keeps serving: {reason}")


class GateRefused(ReloadFailed):
    """A version failed the promotion gate: it never serves."""

    def __init__(self, name: str, version: str, figures: dict):
        self.version = version
        self.figures = dict(figures)
        super().__init__(name, f"version {version} refused by the promotion gate: {figures.get('reason', figures)}")


class WebhookRejected(RegistryError):
    """A webhook delivery that is not MLflow's, is stale, or cannot be read; `status` is the HTTP answer."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(f"webhook delivery rejected ({status}): {reason}")
