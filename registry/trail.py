"""How each layer answered during one resolution: the trail every response and error carries."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Outcome(str, enum.Enum):
    HIT = "hit"
    MISS = "miss"
    UNAVAILABLE = "unavailable"
    REJECTED = "rejected"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LayerAttempt:
    """One layer's answer during one resolution."""

    source: str
    outcome: Outcome
    elapsed_ms: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "outcome": self.outcome.value, "elapsed_ms": round(self.elapsed_ms, 3), "detail": self.detail}
