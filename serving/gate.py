"""The promotion gate: a version classifies a labelled set before it may serve.

`REGISTRY_GATE` names, per model, a JSONL file of `{"text", "label"}` lines (a security team keeps
its must-catch examples there), the accuracy a version must reach, and how much worse than the
serving version on the same set it may be. A version that fails never serves.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from registry.errors import GateRefused, SettingsError
from registry.settings import GateSpec

logger = logging.getLogger(__name__)

Predict = Callable[[Sequence[str]], list[dict[str, Any]]]


@dataclass(frozen=True)
class GateSet:
    """The labelled examples of one model's gate."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]

    @classmethod
    def read(cls, model: str, spec: GateSpec) -> "GateSet":
        where = f"{model}: {spec.path}"
        texts, labels = [], []
        try:
            lines = spec.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError("REGISTRY_GATE", where, f"cannot read the gate set: {exc}") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise SettingsError("REGISTRY_GATE", where, f"line {number} is not JSON: {exc}") from exc
            problem = _row_problem(row)
            if problem:
                raise SettingsError("REGISTRY_GATE", where, f'line {number}: {problem}; each line is {{"text": "...", "label": "..."}}')
            texts.append(row["text"])
            labels.append(row["label"])
        if not texts:
            raise SettingsError("REGISTRY_GATE", where, "the gate set holds no example")
        return cls(tuple(texts), tuple(labels))

    def accuracy(self, predict: Predict) -> float:
        predictions = predict(list(self.texts))
        return sum(p.get("label") == label for p, label in zip(predictions, self.labels)) / len(self.labels)


def _row_problem(row: Any) -> Optional[str]:
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key in ("text", "label"):
        if key not in row:
            return f'no "{key}" (keys: {", ".join(sorted(map(str, row))) or "none"})'
        if not isinstance(row[key], str) or not row[key].strip():
            return f'"{key}" must be a non-empty string'
    return None


class PromotionGate:
    """Checks candidate versions against each model's gate set; remembers the serving versions' figures."""

    def __init__(self, specs: Mapping[str, GateSpec]):
        self.specs = dict(specs)
        self.sets = {model: GateSet.read(model, spec) for model, spec in self.specs.items()}  # read once, at start-up
        self._scores: dict[tuple[str, str, Optional[str]], float] = {}
        self._lock = threading.Lock()

    def __contains__(self, model: str) -> bool:
        return model in self.specs

    def _score(self, model: str, version: str, sha256: Optional[str], predict: Predict) -> float:
        key = (model, version, sha256)
        with self._lock:
            if key in self._scores:
                return self._scores[key]
        score = self.sets[model].accuracy(predict)
        with self._lock:
            self._scores[key] = score
        return score

    def check(self, model: str, version: str, sha256: Optional[str], predict: Predict,
              serving: Optional[tuple[str, Optional[str], Predict]] = None) -> Optional[dict[str, Any]]:
        """The candidate's figures when it passes (None when the model has no gate).

        Args:
            serving: (version, sha256, predict) of the version serving now, to compare against.

        Raises:
            GateRefused: below `min_accuracy`, or worse than the serving version by more than `max_drop`.
        """
        spec = self.specs.get(model)
        if spec is None:
            return None
        accuracy = self._score(model, version, sha256, predict)  # compared unrounded; rounded for display
        figures: dict[str, Any] = {"examples": len(self.sets[model].texts), "accuracy": round(accuracy, 4),
                                   "min_accuracy": spec.min_accuracy}
        if accuracy < spec.min_accuracy:
            figures["reason"] = f"accuracy {accuracy:.4f} on the gate set is below min_accuracy {spec.min_accuracy}"
        elif serving is not None and spec.max_drop is not None and serving[0] != version:
            baseline = self._score(model, serving[0], serving[1], serving[2])
            figures.update(serving_version=serving[0], serving_accuracy=round(baseline, 4), max_drop=spec.max_drop)
            if accuracy < baseline - spec.max_drop - 1e-9:
                figures["reason"] = (f"accuracy {accuracy:.4f} is more than max_drop {spec.max_drop} below "
                                     f"version {serving[0]}'s {baseline:.4f} on the gate set")
        if "reason" in figures:
            logger.warning("[HYBRID] gate refused %s version %s: %s", model, version, figures["reason"])
            raise GateRefused(model, version, figures)
        logger.info("[HYBRID] gate passed %s version %s: accuracy %.4f on %d examples", model, version, figures["accuracy"], figures["examples"])
        return figures
