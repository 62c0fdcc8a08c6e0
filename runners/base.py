"""What every runner shares: fetch once, build, warm up, say what is loaded, give the memory back.

A runner kind subclasses `Runner` and writes two methods, as MLServer's `MLModel` asks for `load`
and `predict`:

    class KeywordRunner(Runner):
        form = "keywords"

        def build(self, location):                # a local directory, or a hub id for the fallback
            self.words = set((location / "words.txt").read_text().split())

        def predict(self, inputs):
            return [{"label": "INJECTION" if set(t.lower().split()) & self.words else "SAFE"} for t in inputs]

`load()` fetches the artifact (unless the host already did), calls `build`, runs `predict` on the
warm-up texts and only then says `ready`; any error on the way is an `ArtifactError` naming the
artifact, so a failed load leaves the serving version in place. Register the kind with
`runners.kinds.register_runner("keywords", KeywordRunner)`, or pass the class (or
`"package.module:Class"`) as `ModelHost(runner=...)`.
"""

from __future__ import annotations

import gc
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from registry.errors import ArtifactError
from registry.record import ModelRecord
from registry.settings import RegistrySettings
from runners.artifacts import ArtifactStore

logger = logging.getLogger(__name__)

#: What every runner predicts once before it says it is ready.
WARMUP_TEXTS = ("warm-up", "a second, somewhat longer text to warm up the model with")
#: The seed's log tag per layer a record came from.
SOURCE_TAGS = {"mlflow": "[MLFLOW]", "huggingface": "[FALLBACK]"}


def pickle_refused(location: str, what: str) -> ArtifactError:
    """The refusal of an artifact that would run code when loaded and that no digest vouches for."""
    return ArtifactError(location, f"{what} runs code when loaded, and the record has no sha256 to verify it against "
                                   "(publish it with a digest, or set REGISTRY_ALLOW_PICKLE=true to trust it)")


class Runner:
    """One model version in memory: `build` it from its artifact, then `predict` answers per input.

    Class attributes a kind may set: `form` (what `/models` calls the artifact), `thread_safe`
    (True lets the host call `predict` from several forward threads at once).
    """

    form: Optional[str] = None
    thread_safe = False

    def __init__(self, record: ModelRecord, settings: RegistrySettings, *, store: Optional[ArtifactStore] = None,
                 location: Union[Path, str, None] = None, **_: Any):
        self.record = record
        self.settings = settings
        self.store = store or ArtifactStore(settings)
        self._location = location  # already fetched and verified by the caller
        self.ready = False
        self.loaded_at: Optional[str] = None
        self.load_seconds: Optional[float] = None

    # -- what a kind writes ------------------------------------------------------------------------
    def build(self, location: Union[Path, str]) -> None:
        """Build the model from its fetched artifact; raise anything (it becomes an ArtifactError)."""
        raise NotImplementedError

    def predict(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        """One answer per input, in order; a classifier answers `{"label", "score"}` (the gate reads `label`)."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """One prediction before serving; by default the warm-up texts must get one answer each."""
        answers = self.predict(list(WARMUP_TEXTS))
        if len(answers) != len(WARMUP_TEXTS):
            raise ValueError(f"{len(answers)} answers for {len(WARMUP_TEXTS)} inputs")

    def release(self) -> None:
        """Drop what `build` made (called by `close` and after a failed load)."""

    def details(self) -> dict[str, Any]:
        """What `/models` says beyond the fields every runner reports."""
        return {}

    # -- the same for every kind -------------------------------------------------------------------
    @property
    def tag(self) -> str:
        return SOURCE_TAGS.get(self.record.source, "[HYBRID]")

    @property
    def labels(self) -> Sequence[str]:
        return ()

    def load(self) -> None:
        """Fetch (unless given), build, warm up; `ready` only once all of that worked.

        Raises:
            ArtifactError: the artifact could not be fetched, verified, built or run.
        """
        if self.ready:
            return
        start = time.perf_counter()
        location = self._location if self._location is not None else self.store.fetch(self.record)
        for step, action in (("loading", self.build), ("warm-up prediction", lambda _: self.warm_up())):
            try:
                action(location)
            except Exception as exc:  # whatever the libraries raise: this artifact does not serve
                self.release()
                if isinstance(exc, ArtifactError):
                    raise
                raise ArtifactError(str(location), f"{step} as {self.form or type(self).__name__} failed: "
                                                   f"{type(exc).__name__}: {exc}") from exc
        self.after_warm_up()
        self.load_seconds = round(time.perf_counter() - start, 3)
        self.loaded_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.ready = True
        logger.info("%s loaded %s v%s (%s, %s) in %.2fs", self.tag, self.record.name, self.record.version, self.form,
                    self.record.source or "?", self.load_seconds)

    def after_warm_up(self) -> None:
        """A step once the model has proved it runs (the text runner's acceleration); nothing by default."""

    def describe(self) -> dict[str, Any]:
        """What `/models` says about the loaded version."""
        return {"name": self.record.name, "version": self.record.version, "source": self.record.source,
                "uri": self.record.location, "form": self.form, "loaded_at": self.loaded_at, "load_seconds": self.load_seconds,
                "sha256": self.record.sha256, "labels": list(self.labels) if self.ready else [], "ready": self.ready,
                **self.details()}

    def close(self) -> None:
        """Give the memory back (the version was swapped out)."""
        self.ready = False
        self.release()
        gc.collect()
