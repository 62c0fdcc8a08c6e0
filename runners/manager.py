"""The models one worker serves: load beside the old version, swap atomically, never drop a request.

A request takes a snapshot of the `ServedModel` it uses (one dict lookup) and keeps it until it
answers, so in-flight requests finish on the version they started on and report that version.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from registry.errors import ArtifactError, ModelNotLoaded, ModelNotResolvable, RegistryError, ReloadFailed, UnknownModel
from registry.record import Resolution, Selector
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from runners.batching import MicroBatcher
from runners.runner import TextClassificationRunner

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One loaded version and everything a response or `/models` says about it."""

    runner: TextClassificationRunner
    resolution: Resolution
    batcher: MicroBatcher
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    pending_version: Optional[str] = None  # what the registry says now, when it differs (reload to switch)

    @property
    def record(self):
        return self.resolution.record

    def identity(self) -> dict[str, Any]:
        """What every classify response carries: which model version made the predictions."""
        record = self.record
        return {"name": record.name, "version": record.version, "source": record.source, "uri": record.location}

    def describe(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "selector": str(self.resolution.selector),
            "loaded_at": self.loaded_at,
            "runner": self.runner.describe(),
            "record": self.record.to_dict(),
            "registry": self.resolution.freshness(time.time()),
            "pending_version": self.pending_version,
            "trail": self.resolution.trail_dicts(),
            "batches": self.batcher.batches,
            "texts": self.batcher.texts,
        }


class ModelManager:
    """Holds the served models of this worker; loads and swaps them, one load at a time."""

    def __init__(self, settings: RegistrySettings, resolver: Resolver,
                 runner_factory: Callable[[Any, RegistrySettings], TextClassificationRunner] = TextClassificationRunner):
        self.settings = settings
        self.resolver = resolver
        self.runner_factory = runner_factory
        self.names = list(settings.models)
        self._served: dict[str, ServedModel] = {}
        self._errors: dict[str, str] = {name: "not loaded yet" for name in self.names}
        self._load_lock = threading.Lock()
        # One thread runs forward passes: the model is used by one batch at a time, and torch's own
        # thread count (settings.torch_threads) decides the parallelism inside it.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    # -- requests -----------------------------------------------------------------------------
    def get(self, name: Optional[str]) -> ServedModel:
        name = name or (self.names[0] if self.names else "")
        served = self._served.get(name)
        if served is not None:
            return served
        if name not in self.names:
            raise UnknownModel(name, self.names)
        raise ModelNotLoaded(name, self._errors.get(name, "not loaded yet"))

    def ready(self) -> bool:
        return bool(self.names) and all(name in self._served for name in self.names)

    def not_ready_reason(self) -> str:
        if not self.names:
            return "no model configured (set REGISTRY_MODELS)"
        return "; ".join(f"{name}: {self._errors.get(name, 'not loaded yet')}" for name in self.names if name not in self._served)

    def served(self) -> dict[str, ServedModel]:
        return dict(self._served)

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    # -- loading ------------------------------------------------------------------------------
    def _load(self, resolution: Resolution) -> ServedModel:
        runner = self.runner_factory(resolution.record, self.settings)
        runner.load()  # fetch, verify, build, warm up: raises ArtifactError saying why
        batcher = MicroBatcher(runner.predict, self.executor, max_batch_size=self.settings.batch_window,
                               wait_ms=self.settings.batch_wait_ms)
        return ServedModel(runner=runner, resolution=resolution, batcher=batcher)

    def activate(self, name: str, selector: Selector | str) -> tuple[Optional[ServedModel], ServedModel]:
        """Resolve, load beside the current version, then swap. Returns (previous, current).

        Raises:
            UnknownModel, ReloadFailed: the current version (if any) keeps serving.
        """
        if name not in self.names:
            raise UnknownModel(name, self.names)
        with self._load_lock:
            try:
                resolution = self.resolver.resolve(name, selector)
            except ModelNotResolvable as exc:
                self._note_error(name, str(exc))
                raise ReloadFailed(name, str(exc)) from exc
            return self._swap_in(name, resolution)

    def _swap_in(self, name: str, resolution: Resolution) -> tuple[Optional[ServedModel], ServedModel]:
        previous = self._served.get(name)
        record = resolution.record
        if previous is not None and record.source == "huggingface" and previous.record.source != "huggingface":
            # The registry is unreachable right now; a pretrained stand-in is worse than what serves.
            raise ReloadFailed(name, f"only the pretrained fallback answered ({_trail_text(resolution)}); "
                                     f"version {previous.record.version} keeps serving")
        if previous is not None and previous.record.version == record.version and previous.record.source != "huggingface" \
                and record.source != "huggingface" and previous.record.sha256 == record.sha256:
            # Same version already serving: keep it (and its warm state), refresh what we know.
            current = dataclasses.replace(previous, resolution=resolution, pending_version=None)
            self._served[name] = current
            return previous, current
        start = time.perf_counter()
        try:
            current = self._load(resolution)
        except (ArtifactError, RegistryError, OSError, RuntimeError, ValueError) as exc:
            reason = f"version {record.version} from {record.source} failed to load: {exc}"
            self._note_error(name, reason)
            logger.error("[HYBRID] %s; %s", reason, "previous version keeps serving" if previous else "nothing to serve yet")
            raise ReloadFailed(name, reason) from exc
        self._served[name] = current  # the swap: one reference assignment
        self._errors.pop(name, None)
        logger.info("[HYBRID] serving %s version %s from %s (loaded in %.2fs%s)", name, record.version, record.source,
                    time.perf_counter() - start, f", replaced version {previous.record.version}" if previous else "")
        return previous, current

    def _note_error(self, name: str, reason: str) -> None:
        if name not in self._served:
            self._errors[name] = reason

    def load_configured(self) -> bool:
        """Try every configured model that is not loaded yet; True when all are."""
        for name in self.names:
            if name in self._served:
                continue
            try:
                self.activate(name, self.settings.alias)
            except ReloadFailed:
                pass  # recorded in _errors; readiness says why
        return self.ready()

    def load_until_ready(self, stop: threading.Event) -> None:
        """Background start-up: keep trying until every model is loaded or the service stops."""
        while not stop.is_set():
            if self.load_configured():
                return
            logger.warning("[HYBRID] not ready: %s; retrying in %.0fs", self.not_ready_reason(), self.settings.retry_interval)
            stop.wait(self.settings.retry_interval)

    def refresh_stale(self) -> None:
        """Ask the registry again for models served from stale memory; versions change only on reload."""
        for name, served in list(self._served.items()):
            if not served.resolution.stale:
                continue
            try:
                fresh = self.resolver.resolve(name, served.resolution.selector)
            except ModelNotResolvable:
                continue
            if fresh.stale:
                continue
            current = self._served.get(name)
            if current is not served:
                continue  # a reload swapped meanwhile
            pending = None if fresh.record.version == served.record.version else fresh.record.version
            if pending:
                logger.warning("[HYBRID] registry reachable again: %s@%s is now version %s (serving %s); POST /reload to switch",
                               name, fresh.selector, pending, served.record.version)
                self._served[name] = dataclasses.replace(served, pending_version=pending)
            else:
                logger.info("[HYBRID] registry reachable again: %s version %s confirmed", name, served.record.version)
                self._served[name] = dataclasses.replace(served, resolution=fresh, pending_version=None)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _trail_text(resolution: Resolution) -> str:
    return ", ".join(f"{a.source}={a.outcome}" for a in resolution.trail)
