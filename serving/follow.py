"""Following the registry: the served version converges to what the configured selector names.

Three triggers lead to one reconcile per model (refresh the cache and the backup from MLflow, then
roll out what changed through the same path as `/reload`):

- MLflow's registry webhooks (`POST /registry/webhook`): one replica receives the delivery; its
  rollout is announced on the reload bus and every worker of every replica applies it;
- a `changed` order on the bus (the publisher's `promote`, `revoke` and `publish`): one worker claims it;
- a reconcile poll every `REGISTRY_POLL_INTERVAL` seconds, at most once per interval per bus
  (webhook delivery is fire-and-forget: the poll makes a lost event harmless).

A pinned version never moves. A version that failed to load or was refused by the gate is not
tried again until the registry names another one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping, Optional

from registry.coordination import CoordinationError, ReloadOrder
from registry.errors import ReloadFailed, SourceUnavailable, WebhookRejected
from registry.record import LayerAttempt, Outcome, Resolution, Selector, iso_utc
from registry.logs import FailureLog, log_fields
from registry.webhook import verify_delivery

if TYPE_CHECKING:
    from serving.host import ModelHost

logger = logging.getLogger(__name__)

#: Delivery ids remembered in this process (besides the bus), to refuse replays while the bus is down.
_SEEN_LIMIT = 10_000


class Follower:
    """Turns registry events and polls into rollouts for one host."""

    def __init__(self, host: "ModelHost"):
        self.host = host
        self.settings = host.settings
        self.selector = Selector.parse(self.settings.alias)
        self._requests: "queue.Queue[tuple[str, str]]" = queue.Queue()
        self._pending: set[tuple[str, str]] = set()
        self._pending_lock = threading.Lock()
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._next_poll = time.monotonic() + self.settings.poll_interval
        self.last_poll: Optional[dict[str, Any]] = None
        self._failures = FailureLog(logger)
        self.last_reconcile: dict[str, dict[str, Any]] = {}

    @property
    def pinned(self) -> bool:
        return self.selector.kind == "version"

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.settings.follow, "selector": str(self.selector), "pinned": self.pinned,
                "poll_interval_s": self.settings.poll_interval, "webhook": self.settings.webhook_secret is not None,
                "last_poll": self.last_poll, "last": self.last_reconcile}

    # -- requests to reconcile, handled one at a time by the follow thread ---------------------------
    def request(self, name: str, trigger: str) -> None:
        with self._pending_lock:
            if (name, trigger) in self._pending:
                return  # one queued reconcile per model and trigger is enough
            self._pending.add((name, trigger))
        self._requests.put((name, trigger))

    def work_step(self) -> None:
        try:
            name, trigger = self._requests.get(timeout=0.5)
        except queue.Empty:
            return
        with self._pending_lock:
            self._pending.discard((name, trigger))
        self.reconcile(name, trigger)

    def reconcile(self, name: str, trigger: str) -> dict[str, Any]:
        """Refresh cache and backup from MLflow, then roll out what the selector names now, if it changed."""
        outcome = self._reconcile(name, trigger)
        self.last_reconcile[name] = {"trigger": trigger, "at": iso_utc(time.time()), **outcome}
        return outcome

    def _reconcile(self, name: str, trigger: str) -> dict[str, Any]:
        if name not in self.host.manager.served():
            # Start-up resolves (and retries) what the selector names; rolling out before the first
            # load finished would only repeat it, holding the reload lock while it waits.
            return {"action": "none", "reason": "not loaded yet: start-up resolves it"}
        start = time.perf_counter()
        try:
            section = self.host.resolver.refresh_from_authority(name)
        except SourceUnavailable as exc:
            self._failures.failed(name, exc.reason, "[MLFLOW] %s: cannot reconcile %s: %s", trigger, name, exc.reason,
                                  extra=log_fields(name, None, "mlflow"))
            return {"action": "none", "reason": f"MLflow unavailable: {exc.reason}"}
        self._failures.recovered(name, "[MLFLOW] %s: reconciling %s again", trigger, name, extra=log_fields(name, None, "mlflow"))
        if self.pinned:
            return {"action": "none", "reason": f"pinned to version {self.selector}"}
        authority = self.host.resolver.authority
        assert authority is not None  # refresh_from_authority raised otherwise
        try:
            record = authority.select(section, name, self.selector)
        except SourceUnavailable as exc:
            return {"action": "none", "reason": f"MLflow unavailable: {exc.reason}"}
        served = self.host.manager.served().get(name)
        if record is None and served is not None and served.runner_is_stand_in:
            return {"action": "none", "reason": "not in MLflow; the pretrained fallback serves"}
        if record is None:
            serving = f"version {served.record.version} keeps serving" if served else "nothing serves"
            logger.warning("[MLFLOW] %s: %s@%s names no version in MLflow now; %s", trigger, name, self.selector, serving)
            return {"action": "none", "reason": f"MLflow has no version for {self.selector}; {serving}"}
        if served is not None and served.record.version == record.version and served.record.sha256 == record.sha256:
            return {"action": "none", "version": record.version, "reason": "already serving"}
        for what, held in (("candidate", self.host.manager.candidates.get(name)), ("wanted", self.host.manager.wanted.get(name))):
            if held and held.get("version") == record.version and held.get("sha256", record.sha256) == record.sha256:
                return {"action": "none", "version": record.version, "reason": f"version {record.version} is the {what} that did not serve"}
        attempt = LayerAttempt("mlflow", Outcome.HIT, (time.perf_counter() - start) * 1000, f"version {record.version} ({trigger})")
        resolution = Resolution(record, (attempt,), self.selector, time.time())
        try:
            result = self.host.rollout(name, self.selector, trigger=trigger, resolution=resolution)
        except ReloadFailed as exc:
            logger.warning("[HYBRID] %s: %s stays on %s: %s", trigger, name, served.record.version if served else "nothing", exc.reason)
            return {"action": "refused", "version": record.version, "reason": exc.reason}
        except CoordinationError as exc:
            return {"action": "failed", "version": record.version, "reason": f"reload coordination failed: {exc}"}
        return {"action": "rolled_out", "version": record.version, "generation": result["generation"],
                "acknowledged": result["workers"]["acknowledged"], "elapsed_ms": result["elapsed_ms"]}

    # -- the reconcile poll ----------------------------------------------------------------------
    def tick(self) -> float:
        """Seconds between two looks at the poll slot: often enough that one worker takes each interval."""
        return min(max(self.settings.poll_interval / 4, 0.2), 5.0)

    def poll_step(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.settings.poll_interval
        try:
            mine = self.host.bus.claim("poll", ttl=self.settings.poll_interval * 0.95)
        except CoordinationError as exc:
            logger.debug("[HYBRID] poll slot unknown (%s): polling on this worker's own clock", exc)
            mine = True
        if not mine:
            # Another worker polls this interval; look again at the slot soon, so that some worker
            # takes the next one even when that worker is gone.
            self._next_poll = now + self.tick()
            return
        started = time.time()
        for name in self.host.manager.names:
            self.reconcile(name, "poll")
        self.last_poll = {"at": iso_utc(started), "elapsed_s": round(time.time() - started, 3), "worker": self.host.worker}

    # -- bus and webhook triggers -----------------------------------------------------------------
    def on_change(self, order: ReloadOrder) -> None:
        """A `changed` order from the bus: one worker of all that share the bus reconciles it."""
        if not self.settings.follow:
            return
        try:
            mine = self.host.bus.claim(f"changed:{order.generation}", ttl=3600)
        except CoordinationError:
            return  # the poll will catch up
        if mine:
            logger.info("[HYBRID] registry changed for %s (announced by %s): reconciling", order.model, order.issued_by)
            self.request(order.model, "bus")

    def webhook(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Verify and act on one MLflow webhook delivery; (HTTP status, JSON body)."""
        secret = self.settings.webhook_secret
        if secret is None:
            return 404, {"error": "the webhook route is off: REGISTRY_WEBHOOK_SECRET is not set on the service"}
        try:
            event = verify_delivery(secret.get_secret_value(), headers, body, now=time.time(),
                                    tolerance=self.settings.webhook_tolerance)
        except WebhookRejected as exc:
            logger.warning("[MLFLOW] webhook delivery refused: %s", exc.reason)
            return exc.status, {"error": exc.reason}
        if not self._first_delivery(event.delivery_id):
            logger.info("[MLFLOW] webhook delivery %s already handled", event.delivery_id)
            return 200, {"status": "duplicate", "delivery_id": event.delivery_id}
        prefix = self.settings.mlflow_prefix
        name = event.registered_name[len(prefix):] if event.registered_name.startswith(prefix) else None
        answer = {"delivery_id": event.delivery_id, "event": event.event, "model": name}
        if not event.known or name not in self.host.manager.names:  # known: the events that can change what a selector names
            return 200, {"status": "ignored", **answer, "reason": "not a model this service serves" if event.known else "event not followed"}
        if not self.settings.follow:
            return 200, {"status": "ignored", **answer, "reason": "REGISTRY_FOLLOW=false"}
        logger.info("[MLFLOW] webhook %s for %s (version %s, alias %s): reconciling", event.event, name, event.version, event.alias)
        self.request(name, "webhook")
        return 202, {"status": "accepted", **answer}

    def _first_delivery(self, delivery_id: str) -> bool:
        now = time.time()
        horizon = 2 * self.settings.webhook_tolerance + 60
        with self._pending_lock:
            while self._seen and next(iter(self._seen.values())) < now - horizon or len(self._seen) > _SEEN_LIMIT:
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
        try:
            return self.host.bus.claim(f"delivery:{delivery_id}", ttl=horizon)
        except CoordinationError:
            return True  # this process had not seen it; the bus cannot say more now
