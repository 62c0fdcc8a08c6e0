"""The model host: everything a BentoML service needs to serve registry-backed models.

It resolves, loads beside, gates and swaps; announces on the reload bus and applies what other
workers and replicas announce; heartbeats what it serves; follows the registry (see
`serving.follow`); and keeps all of that running in background threads that survive any error.
A service holds one host and asks it for the serving snapshot of each request.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from registry.coordination import CHANGED, CoordinationError, ReloadBus, ReloadOrder, replica_id, worker_id
from registry.errors import ReloadFailed, UnknownModel
from registry.logs import FailureLog, configure_logging, log_fields
from registry.metrics import serve_models
from registry.record import Resolution, Selector
from registry.resolver import Resolver
from registry.settings import RegistrySettings
from serving.follow import Follower
from serving.manager import ModelManager, ServedModel

logger = logging.getLogger(__name__)


def declared_hosts(cls: type) -> list[str]:
    """The names of the `ModelHost` attributes a service class declares, in declaration order."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        names += [name for name, value in vars(klass).items() if isinstance(value, ModelHost) and name not in names]
    return names


def hosts_of(instance: Any, *, start: bool = True) -> list["ModelHost"]:
    """The hosts of one service instance (one BentoML worker): what the admin routes ask.

    With `start`, a host the instance has not touched yet is built and started; without, only the
    hosts already started are returned.
    """
    names = declared_hosts(type(instance))
    if start:
        return [getattr(instance, name) for name in names]
    return [host for name in names if isinstance(host := vars(instance).get(name), ModelHost)]


class ModelHost:
    """Owns the resolver, the served models, the reload bus and the background work of one worker.

    Declare one on a BentoML service class; each service instance (each worker) gets its own host,
    built from the environment (`REGISTRY_*`) and started when the instance first touches it:

        @registry_admin
        @bentoml.service
        class Spam:
            host = ModelHost(models=["spam"], runner="mlflow-pyfunc")

    Args:
        settings: the registry settings; default `RegistrySettings.from_env()` in the worker.
        models: the models to serve (overrides `REGISTRY_MODELS`).
        runner: a runner kind from `runners.kinds.RUNNERS` to use for every model; default:
            chosen per artifact (what the MLflow flavors say).
    """

    def __init__(self, settings: Optional[RegistrySettings] = None, *, models: Optional[list[str]] = None,
                 runner: Optional[str] = None):
        self._config = (settings, models, runner)
        self._attribute: Optional[str] = None
        self._started = False

    # -- declared on a class: one host per service instance ----------------------------------------
    def __set_name__(self, owner: type, name: str) -> None:
        self._attribute = name

    def __get__(self, instance: Any, owner: Optional[type] = None) -> "ModelHost":
        if instance is None or self._attribute is None:
            return self
        host = instance.__dict__.get(self._attribute)
        if host is None:
            host = instance.__dict__[self._attribute] = ModelHost(*self._config[:1], models=self._config[1], runner=self._config[2]).start()
        return host

    def settings_now(self) -> RegistrySettings:
        """The settings this host will be built from (read from the environment unless given)."""
        return self._config[0] or RegistrySettings.from_env()

    def check_configuration(self) -> None:
        """Read the settings and the gate sets as the workers will; raises SettingsError naming the variable."""
        from serving.gate import PromotionGate
        from runners.kinds import runner_factory

        settings = self._config[0] or RegistrySettings.from_env()
        PromotionGate(settings.gate)
        runner_factory(self._config[2])

    def _build(self) -> None:
        from runners.kinds import runner_factory

        settings, models, runner = self._config
        settings = settings or RegistrySettings.from_env()
        if models is not None:
            settings = RegistrySettings.from_env(**{**settings.model_dump(), "models": models})
        self.settings = settings
        # BentoML's handlers pass WARNING and up from other loggers; our INFO lines (the final
        # choice of each resolution, swaps, reloads) are part of the product.
        configure_logging(settings.log_level, settings.log_format)
        serve_models(settings.models)  # the only `model` label values besides `other`
        self.worker = worker_id()
        self.replica = replica_id()
        self.resolver = Resolver.from_settings(settings)
        self.manager = ModelManager(settings, self.resolver, runner_factory(runner))
        self.bus = ReloadBus.from_settings(settings)
        self.follower = Follower(self)
        self._stop = threading.Event()
        self._seen_generation = self._bus_generation()
        self._threads: list[threading.Thread] = []
        self.started_at = time.time()

    def start(self) -> "ModelHost":
        """Build from the settings, then start the background work: loading, heartbeat, bus watcher
        and, when following, the poll. Returns the host."""
        if self._started:
            return self
        self._build()
        self._started = True
        import torch

        torch.set_num_threads(self.manager.torch_threads)
        loops: list[tuple[str, Callable[[], None], float | Callable[[], float]]] = [
            ("model-loader", self._load_step, self.settings.retry_interval),
            ("heartbeat", self._heartbeat_step, 1.0),
            ("reload-watcher", self._watch_step, 0.25),
        ]
        if self.settings.follow:
            loops += [("follow", self.follower.work_step, 0.0), ("registry-poll", self.follower.poll_step, self.follower.tick)]
        for name, step, wait in loops:
            thread = threading.Thread(target=supervised, args=(name, step, wait, self._stop), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("[HYBRID] worker %s starting: models %s, selector %s, layers %s, reload bus %s, follow %s", self.worker,
                    self.settings.models, self.settings.alias, [s.source_id for s in self.resolver.sources], self.bus.kind,
                    f"on (poll every {self.settings.poll_interval:.0f}s)" if self.settings.follow else "off")
        return self

    def stop(self) -> None:
        self._stop.set()
        self.manager.close()
        self.resolver.close()
        self.bus.close()

    # -- what requests ask -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self.manager.names

    def get(self, name: Optional[str] = None) -> ServedModel:
        """The snapshot one request uses until it answers.

        Raises:
            UnknownModel, ModelNotLoaded.
        """
        return self.manager.get(name)

    def replica_ready(self) -> tuple[bool, str]:
        """Every live worker of this replica has loaded every model (what `/readyz` answers).

        A readiness probe reaches one worker of several; a replica whose other worker is still
        loading would otherwise take traffic that worker answers with 503. When the bus cannot
        be asked, this worker's own state decides.
        """
        if not self.manager.ready():
            return False, self.manager.not_ready_reason()
        try:
            beats = self.bus.beats()
        except CoordinationError:
            return True, ""
        loading = [w for w, beat in beats.items() if beat.get("replica") == self.replica
                   and not all(name in (beat.get("loaded") or ()) for name in self.manager.names)]
        if loading:
            return False, f"worker(s) {', '.join(sorted(loading))} of this replica still loading"
        return True, ""

    # -- background steps ------------------------------------------------------------------------
    def _bus_generation(self) -> int:
        try:
            return self.bus.generation()
        except CoordinationError as exc:
            logger.warning("[HYBRID] reload bus unavailable at start-up: %s", exc)
            return 0

    def _load_step(self) -> None:
        if not self.manager.ready():
            start = time.perf_counter()
            if self.manager.load_configured(self._replica_versions):
                _FAILURES.recovered(f"{self.worker}:load", "[HYBRID] worker %s loads again", self.worker)
                logger.info("[HYBRID] worker %s ready in %.2fs", self.worker, time.perf_counter() - start)
            else:
                # Once when loading starts failing, not every retry: the reason stays on /readyz and /models.
                reason = self.manager.not_ready_reason()
                _FAILURES.failed(f"{self.worker}:load", reason, "[HYBRID] not ready: %s; retrying every %.0fs (logged once; "
                                 "/readyz and /models say why until it loads)", reason, self.settings.retry_interval)
            return
        # Revalidate models served from stale memory, and retry versions that could not load.
        self.manager.refresh_stale()
        self.manager.retry_wanted()

    def _replica_versions(self, name: str) -> list[str]:
        """Versions of `name` other live workers serve, most served first (a start-up candidate)."""
        try:
            serving = self.bus.serving()
        except CoordinationError:
            return []
        counts: dict[str, int] = {}
        for worker, models in serving.items():
            if worker != self.worker and name in models:
                counts[models[name]] = counts.get(models[name], 0) + 1
        return sorted(counts, key=lambda v: (-counts[v], -int(v)))

    def _heartbeat_step(self) -> None:
        self.bus.heartbeat(self.worker, self.manager.served_versions(), self.replica, sorted(self.manager.served()))

    def _watch_step(self) -> None:
        """Apply reload orders announced by other workers or replicas, in order, and acknowledge them."""
        generation = self.bus.generation()
        if generation < self._seen_generation:
            # The counter went back (a Redis without persistence restarted, or a failover lost
            # writes): follow the bus's new numbering instead of ignoring every order below the old one.
            logger.warning("[HYBRID] reload bus generation went back from %d to %d; following the new numbering",
                           self._seen_generation, generation)
            self._seen_generation = generation
            return
        if generation == self._seen_generation:
            return
        for order in self.bus.orders_after(self._seen_generation):
            if order.model in self.manager.names:
                if order.kind == CHANGED:
                    self.follower.on_change(order)
                elif order.issued_by != self.worker:
                    result = self._apply(order)
                    try:
                        self.bus.ack(order.generation, self.worker, result)
                    except CoordinationError as exc:
                        logger.warning("[HYBRID] could not acknowledge reload %d: %s", order.generation, exc)
            self._seen_generation = max(self._seen_generation, order.generation)

    def _apply(self, order: ReloadOrder) -> dict[str, Any]:
        try:
            _, current = self.manager.activate(order.model, order.version, trigger="bus")
            return {"ok": True, "version": current.record.version, "source": current.record.source}
        except (ReloadFailed, UnknownModel) as exc:
            return {"ok": False, "error": str(exc)}

    # -- the one path every version change takes -------------------------------------------------
    def rollout(self, name: str, selector: Selector, *, trigger: str = "reload",
                resolution: Optional[Resolution] = None) -> dict[str, Any]:
        """Load beside, gate, swap, announce on the bus and wait until every live worker acknowledged.

        Raises:
            UnknownModel, ReloadFailed (GateRefused among them), CoordinationError.
        """
        start = time.perf_counter()
        with self.bus.lock(timeout=self.settings.reload_ack_timeout):
            previous, current = self.manager.activate(name, selector, resolution=resolution, trigger=trigger)
            order = self.bus.announce(name, current.record.version, str(selector), self.worker)
            self.bus.ack(order.generation, self.worker, {"ok": True, "version": current.record.version, "source": current.record.source})
            acks, missing = self.bus.wait_for_acks(order.generation, self.settings.reload_ack_timeout)
        changed = previous is None or previous.record.version != current.record.version
        logger.info("[HYBRID] %s %s: version %s%s (generation %d, %d/%d workers acknowledged)", trigger, name, current.record.version,
                    f", was {previous.record.version}" if previous and changed else "", order.generation,
                    sum(1 for a in acks.values() if a.get("ok")), len(acks) + len(missing),
                    extra=log_fields(name, current.record.version, current.record.source))
        return {
            "model": name,
            "trigger": trigger,
            "previous": previous.record.to_dict() if previous else None,
            "current": current.record.to_dict(),
            "trail": current.resolution.trail_dicts(),
            "gate": current.gate,
            "generation": order.generation,
            "workers": {
                "acknowledged": sum(1 for a in acks.values() if a.get("ok")),
                "failed": {w: a.get("error") for w, a in acks.items() if not a.get("ok")},
                "missing": missing,
                "acks": acks,
            },
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 1),
        }

    # -- introspection ---------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        return {"worker": self.worker, "ready": self.manager.ready(), "degraded": self.manager.degraded(),
                "models": {name: self.manager.describe(name) for name in self.manager.names}}

    def health(self) -> dict[str, Any]:
        start = time.perf_counter()
        layers = [h.to_dict() for h in self.resolver.health(self.manager.names)]
        try:
            serving = self.bus.serving()
            bus: dict[str, Any] = {"kind": self.bus.kind, "reachable": True, "generation": self.bus.generation(), "serving": serving,
                                   "live_workers": sorted(serving)}
        except CoordinationError as exc:
            bus = {"kind": self.bus.kind, "reachable": False, "error": str(exc)}
        return {
            "status": "ok" if self.manager.ready() else "not_ready",
            "degraded": self.manager.degraded(),
            "worker": self.worker,
            "serving": {name: {**s.identity(), "registry": s.resolution.freshness(time.time()), "pending_version": s.pending_version}
                        for name, s in self.manager.served().items()},
            "wanted": dict(self.manager.wanted),
            "last_known": self.resolver.last_known(),
            "layers": layers,
            "reload_bus": bus,
            "follow": self.follower.describe(),
            "signed": self.settings.signing_key is not None,
            "elapsed_ms": round((time.perf_counter() - start) * 1000, 3),
        }


def supervised(name: str, step: Callable[[], None], wait: float | Callable[[], float], stop: threading.Event) -> None:
    """Run `step` until `stop`, waiting `wait` seconds between runs; an error is logged once and retried.

    Background work must never die silently: any exception is caught here and the step runs again
    after the wait. A step that keeps failing logs one WARNING when it starts failing (with its
    traceback, unless the reload bus is merely down), DEBUG for every later attempt, and one INFO
    when it recovers.
    """
    failures = FailureLog(logger)
    while not stop.is_set():
        try:
            step()
            failures.recovered(name, "[HYBRID] %s recovered", name)
        except Exception as exc:  # noqa: BLE001 - this loop is the last line of defence
            cause = f"{type(exc).__name__}: {exc}"
            failures.failed(name, cause, "[HYBRID] %s failed, retrying: %s", name, cause,
                            exc_info=None if isinstance(exc, CoordinationError) else exc)
        stop.wait(wait() if callable(wait) else wait)


#: What keeps failing in this process's hosts (keys name the worker), logged once.
_FAILURES = FailureLog(logger)
