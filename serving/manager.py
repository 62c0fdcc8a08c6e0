"""The models one worker serves: load beside the old version, swap atomically, never drop a request.

A request takes a snapshot of the `ServedModel` it uses (one dict lookup) and keeps it until it
answers, so in-flight requests finish on the version they started on and report that version.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from registry.errors import ArtifactError, GateRefused, ModelNotLoaded, ModelNotResolvable, RegistryError, ReloadFailed, UnknownModel
from registry.record import Resolution, Selector, iso_utc
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from registry.logs import FailureLog, log_fields
from registry.metrics import metrics, serving_changed
from serving.batching import MicroBatcher, forward_plan
from serving.gate import PromotionGate
from runners import kinds
from runners.kinds import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One loaded version and everything a response or `/models` says about it."""

    runner: ModelRunner
    resolution: Resolution
    batcher: MicroBatcher
    loaded_at: Optional[str] = field(default_factory=lambda: iso_utc(time.time()))
    pending_version: Optional[str] = None  # what the registry says now, when it differs (reload to switch)
    gate: Optional[dict[str, Any]] = None  # the promotion gate's figures for this version
    runner_is_stand_in: bool = False  # the pretrained fallback, not a registry version

    @property
    def record(self):
        return self.resolution.record

    async def predict(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """Answers for one request, batched with other requests' inputs on this version."""
        return await self.batcher.predict(inputs)

    def identity(self) -> dict[str, Any]:
        """What every classify response carries: which model version made the predictions."""
        record = self.record
        execution = getattr(self.runner, "execution", "eager")  # set once at load; only an accelerated runner says so
        return {"name": record.name, "version": record.version, "source": record.source, "uri": record.location,
                **({} if execution == "eager" else {"execution": execution})}

    def describe(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "selector": str(self.resolution.selector),
            "loaded_at": self.loaded_at,
            "runner": self.runner.describe(),
            "record": self.record.to_dict(),
            "registry": self.resolution.freshness(time.time()),
            "pending_version": self.pending_version,
            "gate": self.gate,
            "trail": self.resolution.trail_dicts(),
            "batches": self.batcher.batches,
            "texts": self.batcher.texts,
            "forward_threads": self.batcher.lanes,
        }


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # a worker serving only non-torch runners
        return False
    return torch.cuda.is_available()


class ModelManager:
    """Holds the served models of this worker; loads, gates and swaps them, one load at a time.

    Per model it also says what it would rather serve (`wanted`: the version the registry named at
    start-up when that version could not load or pass the gate) and the last version it tried to
    roll to and did not (`candidate`).
    """

    def __init__(self, settings: RegistrySettings, resolver: Resolver,
                 runner_factory: Optional[Callable[[Any, RegistrySettings], ModelRunner]] = None,
                 gate: Optional[PromotionGate] = None):
        self.settings = settings
        self.resolver = resolver
        self.runner_factory = runner_factory or kinds.runner_factory()
        self.gate = gate if gate is not None else PromotionGate(settings.gate)
        self.names = list(settings.models)
        self._served: dict[str, ServedModel] = {}
        self._errors: dict[str, str] = {name: "not loaded yet" for name in self.names}
        self.wanted: dict[str, dict[str, Any]] = {}
        self.candidates: dict[str, dict[str, Any]] = {}
        self._retry_at: dict[str, tuple[float, float]] = {}  # name -> (monotonic time of the next try, backoff)
        self._load_lock = threading.Lock()
        self._heap_frozen = False
        self._failures = FailureLog(logger)
        # `lanes` threads run forward passes, shared by every model of this worker; torch's own
        # thread count decides the parallelism inside each pass (host.start sets it).
        self.lanes, self.torch_threads = forward_plan(settings.forward_threads, settings.torch_threads,
                                                      workers=settings.workers, cuda=_cuda())
        self.executor = ThreadPoolExecutor(max_workers=self.lanes, thread_name_prefix="forward")

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

    def degraded(self) -> bool:
        """Whether any model serves something other than what it wanted."""
        return bool(self.wanted)

    def not_ready_reason(self) -> str:
        if not self.names:
            return "no model configured (set REGISTRY_MODELS)"
        return "; ".join(f"{name}: {self._errors.get(name, 'not loaded yet')}" for name in self.names if name not in self._served)

    def served(self) -> dict[str, ServedModel]:
        return dict(self._served)

    def served_versions(self) -> dict[str, str]:
        """model -> version serving now (what the heartbeat tells the other replicas)."""
        return {name: served.record.version for name, served in self._served.items() if not served.runner_is_stand_in}

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def describe(self, name: str) -> dict[str, Any]:
        """What `/models` says of one model: what serves, and what it wanted or tried and did not."""
        served = self._served.get(name)
        body: dict[str, Any] = served.describe() if served is not None else {"name": name, "loaded": False, "error": self._errors.get(name)}
        if served is not None:
            body["torch_threads"] = self.torch_threads  # of each forward pass; `forward_threads` says how many at once
        if name in self.wanted:
            body["wanted"] = self.wanted[name]
        if name in self.candidates:
            body["candidate"] = self.candidates[name]
        return body

    # -- loading ------------------------------------------------------------------------------
    def _load(self, resolution: Resolution) -> ServedModel:
        runner = self.runner_factory(resolution.record, self.settings)
        runner.load()  # fetch, verify, build, warm up: raises ArtifactError saying why
        # A runner that does not say its predict may run in several threads at once gets one lane.
        lanes = self.lanes if getattr(runner, "thread_safe", False) else 1
        batcher = MicroBatcher(runner.predict, self.executor, max_texts=self.settings.batch_max_texts,
                               wait_ms=self.settings.batch_wait_ms, lanes=lanes, weigh=getattr(runner, "weigh", None))
        return ServedModel(runner=runner, resolution=resolution, batcher=batcher)

    def activate(self, name: str, selector: Selector | str, *, resolution: Optional[Resolution] = None,
                 trigger: str = "reload") -> tuple[Optional[ServedModel], ServedModel]:
        """Resolve (unless `resolution` is given), load beside the current version, gate, then swap.

        Returns (previous, current). `trigger` (startup, reload, webhook, poll, bus) labels the
        `registry_reloads_total` metric.

        Raises:
            UnknownModel, ReloadFailed (GateRefused among them): the current version (if any) keeps serving.
        """
        if name not in self.names:
            raise UnknownModel(name, self.names)
        with self._load_lock:
            if resolution is None:
                try:
                    resolution = self.resolver.resolve(name, selector)
                except ModelNotResolvable as exc:
                    self._note_error(name, str(exc))
                    metrics().reloads.labels(name, trigger, "unresolved").inc()
                    raise ReloadFailed(name, str(exc)) from exc
            try:
                previous, current = self._swap_in(name, resolution)
            except ReloadFailed as exc:
                self.candidates[name] = _candidate(resolution.record.version, resolution.record.sha256, exc)
                metrics().reloads.labels(name, trigger, "refused" if isinstance(exc, GateRefused) else "failed").inc()
                raise
            metrics().reloads.labels(name, trigger, "ok").inc()
            self.candidates.pop(name, None)
            wanted = self.wanted.get(name)
            if wanted is not None and (wanted["version"] == current.record.version or str(resolution.selector) == self.settings.alias):
                self.wanted.pop(name, None)
                self._retry_at.pop(name, None)
            return previous, current

    def _swap_in(self, name: str, resolution: Resolution) -> tuple[Optional[ServedModel], ServedModel]:
        previous = self._served.get(name)
        record = resolution.record
        stand_in = self.resolver.is_stand_in(record)
        if previous is not None and stand_in and not previous.runner_is_stand_in:
            # The registry is unreachable right now; a pretrained stand-in is worse than what serves.
            raise ReloadFailed(name, f"only the pretrained fallback answered ({_trail_text(resolution)}); "
                                     f"version {previous.record.version} keeps serving")
        if previous is not None and previous.record.version == record.version and not previous.runner_is_stand_in \
                and not stand_in and previous.record.sha256 == record.sha256:
            # Same version already serving: keep it (and its warm state), refresh what we know.
            current = dataclasses.replace(previous, resolution=resolution, pending_version=None)
            self._set_served(name, current)
            return previous, current
        start = time.perf_counter()
        try:
            current = self._load(resolution)
        except (ArtifactError, RegistryError, OSError, RuntimeError, ValueError) as exc:
            reason = f"version {record.version} from {record.source} failed to load: {exc}"
            self._note_error(name, reason)
            # Once while the same version keeps failing (start-up retries it every interval).
            self._failures.failed(f"{name}@{record.version}", reason, "[HYBRID] %s; %s", reason,
                                  "previous version keeps serving" if previous else "nothing to serve yet",
                                  extra=log_fields(name, record.version, record.source))
            raise ReloadFailed(name, reason) from exc
        try:
            current.gate = self.gate.check(name, record.version, record.sha256, current.runner.predict,
                                           None if previous is None else (previous.record.version, previous.record.sha256, previous.runner.predict))
        except GateRefused as exc:
            current.runner.close()
            self._note_error(name, str(exc))
            metrics().gate_refusals.labels(name).inc()
            raise
        metrics().load_seconds.labels(name).observe(time.perf_counter() - start)
        current.runner_is_stand_in = stand_in
        self._set_served(name, current)  # the swap: one reference assignment
        self._errors.pop(name, None)
        self._failures.recovered(f"{name}@{record.version}", "[HYBRID] %s version %s loads now", name, record.version,
                                 extra=log_fields(name, record.version, record.source))
        if not self._heap_frozen:
            # Once per worker, after its first load: the libraries that load imported (torch,
            # transformers, MLflow: some 700,000 objects) leave the cyclic collector's sight, so a
            # full collection no longer walks them (measured: it paused the whole worker for 380 ms,
            # about once a minute at 32 clients; 10-15 ms since). Only this once: a version frozen
            # at a later swap could never have its reference cycles (a pt2 GraphModule has one)
            # collected once swapped out; the first version's are the one bounded exception.
            gc.freeze()
            self._heap_frozen = True
        logger.info("[HYBRID] serving %s version %s from %s (loaded in %.2fs%s)", name, record.version, record.source,
                    time.perf_counter() - start, f", replaced version {previous.record.version}" if previous else "",
                    extra=log_fields(name, record.version, record.source))
        return previous, current

    def _set_served(self, name: str, current: ServedModel) -> None:
        previous = self._served.get(name)
        self._served[name] = current
        serving_changed(name, previous, current)
        metrics().staleness.labels(name).set(current.resolution.stale_for(time.time()))

    def _note_error(self, name: str, reason: str) -> None:
        if name not in self._served:
            self._errors[name] = reason

    def start(self, name: str, replica_versions: Callable[[str], list[str]]) -> bool:
        """Start-up: the first loadable candidate serves; True once one does.

        Candidates, in order: what the chain resolves the configured selector to; the same selector
        from the layers below (passing over versions that did not load); the versions other live
        replicas serve (the reload bus knows); the pretrained fallback. When the first could not
        load, `wanted` says which version and why, and `retry_wanted` tries it again with backoff.
        """
        selector = Selector.parse(self.settings.alias)
        tried: list[tuple[str, Optional[str]]] = []
        wanted: Optional[dict[str, Any]] = None

        def attempt(resolution: Resolution) -> bool:
            nonlocal wanted
            try:
                self.activate(name, selector, resolution=resolution, trigger="startup")
            except ReloadFailed as exc:
                tried.append((resolution.record.version, resolution.record.sha256))
                if wanted is None:
                    wanted = _candidate(resolution.record.version, resolution.record.sha256, exc)
                return False
            if wanted is not None and wanted["version"] != self._served[name].record.version:
                self.wanted[name] = {"version": wanted["version"], "reason": wanted["reason"]}
                self._retry_at.setdefault(name, (time.monotonic() + self.settings.retry_interval, self.settings.retry_interval))
                logger.warning("[HYBRID] %s serves version %s instead of version %s (%s); retrying that with backoff",
                               name, self._served[name].record.version, wanted["version"], wanted["reason"])
            self.candidates.pop(name, None)
            return True

        for _ in range(len(self.resolver.sources) + 1):  # each pass excludes one more version
            try:
                resolution = self.resolver.resolve(name, selector, exclude=tried)
            except ModelNotResolvable as exc:
                if wanted is None:
                    self._note_error(name, str(exc))
                break
            if attempt(resolution):
                return True
        for version in replica_versions(name):
            if any(version == v for v, _ in tried):
                continue
            try:
                resolution = self.resolver.resolve(name, version, exclude=tried)
            except ModelNotResolvable:
                continue
            logger.info("[HYBRID] %s: trying version %s, which another live replica serves", name, version)
            if attempt(resolution):
                return True
        try:
            resolution = self.resolver.fallback(name)
        except ModelNotResolvable:
            return False
        return attempt(resolution)

    def load_configured(self, replica_versions: Callable[[str], list[str]] = lambda name: []) -> bool:
        """Try every configured model that is not loaded yet; True when all are."""
        for name in self.names:
            if name not in self._served:
                self.start(name, replica_versions)
        return self.ready()

    def retry_wanted(self) -> None:
        """Try again, with exponential backoff, the versions that could not load at start-up."""
        now = time.monotonic()
        for name, (at, backoff) in list(self._retry_at.items()):
            if now < at or name not in self.wanted:
                continue
            try:
                self.activate(name, self.settings.alias, trigger="startup")
            except ReloadFailed as exc:
                backoff = min(backoff * 2, MAX_RETRY_BACKOFF)
                self._retry_at[name] = (time.monotonic() + backoff, backoff)
                if name in self.wanted:
                    self.wanted[name]["reason"] = exc.reason
                self._failures.failed(f"{name}:wanted", exc.reason, "[HYBRID] %s: wanted version still not serving (%s); "
                                      "retrying with backoff (now %.0fs)", name, exc.reason, backoff, extra=log_fields(name))
                continue
            self._failures.recovered(f"{name}:wanted", "[HYBRID] %s: the configured selector loads again", name, extra=log_fields(name))
            if name in self.wanted:  # the selector now names a version that loaded, but not the one wanted
                self._retry_at[name] = (time.monotonic() + backoff, backoff)

    def refresh_stale(self) -> None:
        """Ask the registry again for models served from stale memory; versions change only on reload or follow."""
        for name, served in list(self._served.items()):
            if not served.resolution.stale:
                continue
            metrics().staleness.labels(name).set(served.resolution.stale_for(time.time()))
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
                logger.warning("[HYBRID] registry reachable again: %s@%s is now version %s (serving %s)",
                               name, fresh.selector, pending, served.record.version)
                self._set_served(name, dataclasses.replace(served, resolution=fresh, pending_version=pending))
            else:
                logger.info("[HYBRID] registry reachable again: %s version %s confirmed", name, served.record.version)
                self._set_served(name, dataclasses.replace(served, resolution=fresh, pending_version=None))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


#: Longest wait between two tries of a wanted version that does not load.
MAX_RETRY_BACKOFF = 300.0


def _candidate(version: str, sha256: Optional[str], exc: ReloadFailed) -> dict[str, Any]:
    status = "refused" if isinstance(exc, GateRefused) else "failed"
    body: dict[str, Any] = {"version": version, "sha256": sha256, "status": status, "reason": exc.reason}
    if isinstance(exc, GateRefused):
        body["gate"] = exc.figures
    return body


def _trail_text(resolution: Resolution) -> str:
    return ", ".join(f"{a.source}={a.outcome}" for a in resolution.trail)
