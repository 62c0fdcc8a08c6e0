"""Opt-in accelerated execution of a loaded transformers classifier (`REGISTRY_ACCELERATE`).

`int8`: torch dynamic quantization of every `torch.nn.Linear` (weights stored as int8, activations
quantized per batch at run time; `torch.ao.quantization.quantize_dynamic`). On a CPU without a GPU
this is where most of a BERT-style encoder's time goes, and the quantized kernels are about twice as fast.

Nothing accelerated serves unless it agrees with the eager model first: at load, both classify the
parity texts (the model's gate set when one is configured, else the warm-up texts); every label must
be the same and no class probability may differ by more than `REGISTRY_ACCELERATE_MAX_DIFF`. When
that fails (or the model cannot be accelerated), the eager model serves and the runner says why.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from registry.settings import ACCELERATIONS

logger = logging.getLogger(__name__)


Forward = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass
class Parity:
    """How the accelerated model compared with the eager one on the parity texts."""

    texts: int
    label_mismatches: int
    max_diff: float
    source: str
    engine: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"texts": self.texts, "label_mismatches": self.label_mismatches, "max_diff": round(self.max_diff, 6),
                "source": self.source, "engine": self.engine}


class AccelerationRefused(Exception):
    """Why an accelerated forward pass does not serve."""


#: Quantized kernel libraries, best first. Measured on this project's 2-core Xeon, MiniLM, batches of 8, one thread:
#: onednn 2.0-2.7x eager, fbgemm 1.3-2.1x, x86 (torch's default) 1.2-2.1x; the longer the texts, the wider the gap.
ENGINES = ("onednn", "x86", "fbgemm")


def quantized_engine() -> str:
    """Select the fastest available quantized engine for this process (a process-wide torch setting) and name it."""
    supported = torch.backends.quantized.supported_engines
    engine = next((e for e in ENGINES if e in supported), torch.backends.quantized.engine)
    if torch.backends.quantized.engine != engine:
        torch.backends.quantized.engine = engine
    return engine


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with every Linear layer dynamically quantized to int8 (the eager module is untouched).

    Weights are packed for the engine selected now; forward passes use the same process-wide engine.
    """
    from torch.ao.quantization import quantize_dynamic

    quantized_engine()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notes are not the operator's concern
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=False).eval()


def parity_texts(model: str, gate: Optional[Any], fallback: Sequence[str], limit: int = 256) -> tuple[list[str], str]:
    """The texts both models must agree on: the model's gate set (first `limit`, read by the gate's own
    reader) when configured and readable, else `fallback`."""
    if gate is not None:
        from registry.errors import SettingsError
        from runners.gate import GateSet

        try:
            texts = list(GateSet.read(model, gate).texts[:limit])
            return texts, f"gate set {Path(gate.path).name} ({len(texts)} texts)"
        except SettingsError as exc:
            logger.warning("accelerate: %s; checking parity on the warm-up texts", exc)
    return list(fallback), f"warm-up texts ({len(fallback)})"


def compare(eager: Forward, accelerated: Forward, batches: Sequence[Mapping[str, torch.Tensor]], source: str) -> Parity:
    """Class probabilities of both forward passes over the same encoded batches."""
    mismatches, worst, n = 0, 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            p = torch.softmax(eager(batch).float(), dim=-1)
            q = torch.softmax(accelerated(batch).float(), dim=-1)
            mismatches += int((p.argmax(dim=-1) != q.argmax(dim=-1)).sum())
            worst = max(worst, float((p - q).abs().max()))
            n += int(p.shape[0])
    return Parity(n, mismatches, worst, source)


def accelerate(kind: str, module: Optional[torch.nn.Module], eager: Forward,
               wrap: Callable[[torch.nn.Module], Forward], batches: Sequence[Mapping[str, torch.Tensor]],
               source: str, max_diff: float) -> tuple[Forward, Parity]:
    """The accelerated forward pass when it agrees with `eager` on `batches`.

    `wrap` turns a module into a forward pass the way the loader did for the eager one.

    Raises:
        AccelerationRefused: it cannot be built or does not agree; the message says why.
    """
    if kind not in ACCELERATIONS:
        raise AccelerationRefused(f"unknown acceleration {kind!r} (known: {', '.join(ACCELERATIONS)})")
    if module is None:
        raise AccelerationRefused("this artifact form has no eager torch module to quantize (exported programs are not)")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise AccelerationRefused(f"int8 dynamic quantization runs on the CPU only (the model is on {device})")
    try:
        forward = wrap(quantize_int8(module))
        parity = compare(eager, forward, batches, source)
        parity.engine = torch.backends.quantized.engine
    except Exception as exc:  # a layer or kernel torch cannot quantize here: eager serves
        raise AccelerationRefused(f"{kind} failed: {type(exc).__name__}: {exc}") from exc
    if parity.label_mismatches:
        raise AccelerationRefused(f"parity: {parity.label_mismatches} of {parity.texts} labels differ from eager on the {source}")
    if parity.max_diff > max_diff:
        raise AccelerationRefused(f"parity: max probability difference {parity.max_diff:.3g} > {max_diff:g} on the {source}")
    return forward, parity
