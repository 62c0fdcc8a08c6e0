"""The demo MiniLM classifier the hot path, reload, cold-start and robustness areas serve, and the text mix they send.

The length-robust demo model (training/demo.py, its defaults: what `make serve` trains, windows of
256 tokens) trained once and published twice (versions 1 and 2, same weights, two artifacts: the
reload area switches between them) into a sqlite MLflow store under `data/bench/demo/`, which the
repository ignores; later runs reuse it. The artifact cache beside it stays warm across runs, so
every load compared in the suite reads the same local files. A store made by an older recipe
(`meta.json`'s `recipe` differs from RECIPE) is replaced.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from registry.record import ModelRecord
from registry.settings import RegistrySettings

logger = logging.getLogger(__name__)

NAME = "prompt_injection"
VERSIONS = 2
#: What the stored demo model was trained as; a store of another recipe is trained again.
RECIPE = "length-robust-v2 (training.demo defaults: 256-token windows, 3 frozen layers)"


@dataclass(frozen=True)
class DemoModel:
    """Where the demo model is registered, and its two versions' records."""

    root: Path
    name: str
    tracking_uri: str
    artifact_cache: Path
    records: dict[str, ModelRecord]
    meta: dict[str, Any]

    @property
    def registered_name(self) -> str:
        return f"security_{self.name}"

    def settings(self, **overrides: Any) -> RegistrySettings:
        values: dict[str, Any] = dict(
            models=[self.name], mlflow_tracking_uri=self.tracking_uri, backup_path=self.root / "model_registry.json",
            artifact_cache=self.artifact_cache, redis_url=None, training_api_url=None,
        )
        values.update(overrides)
        return RegistrySettings.from_env(**values)


def ensure_demo_model(root: Path, say: Callable[[str], None] = print) -> DemoModel:
    """Reuse the registered demo model under `root`, or train it (training.demo's defaults) and publish it twice."""
    import shutil

    from registry.sources.mlflow_registry import MLflowRegistrySource

    meta_path = root / "meta.json"
    if root.exists() and (not meta_path.exists() or json.loads(meta_path.read_text()).get("recipe") != RECIPE):
        say(f"[bench] {root} holds a demo model of another recipe: replacing it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = dict(models=[NAME], mlflow_tracking_uri=uri, backup_path=root / "model_registry.json",
                artifact_cache=root / "artifacts", redis_url=None, training_api_url=None)
    settings = RegistrySettings.from_env(**base)
    source = MLflowRegistrySource.from_settings(settings)
    assert source is not None
    try:
        section = source.section(NAME)
        have = len(section.versions) if section else 0
        if have < VERSIONS:
            from training.demo import TrainingConfig, _quiet_transformers, train
            from training.publisher import Publisher

            _quiet_transformers()
            say(f"[bench] training the length-robust demo MiniLM classifier ({TrainingConfig.epochs} epochs, a few minutes) "
                f"into {root} - once; later runs reuse it")
            started = time.perf_counter()
            result = train(TrainingConfig())
            trained = time.perf_counter() - started
            publisher = Publisher(settings)
            try:
                for _ in range(VERSIONS - have):
                    published = publisher.publish(NAME, result.model, result.tokenizer, result.metrics,
                                                  params={**result.params, "purpose": "bench"})
                    say(f"[bench] published {published.record.name} version {published.record.version}")
            finally:
                publisher.close()
            meta_path.write_text(json.dumps({"recipe": RECIPE, "metrics": result.metrics, "train_seconds": round(trained, 1),
                                             "params": result.params,
                                             "publish_seconds": round(time.perf_counter() - started - trained, 1)}, indent=2))
            section = source.section(NAME)
        assert section is not None
        records = {r.version: r for r in section.versions[:VERSIONS]}
    finally:
        source.close()
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return DemoModel(root, NAME, uri, root / "artifacts", records, meta)


def text_mix(seed: int = 5) -> list[str]:
    """A fixed mix of realistic lengths: 52 texts of the demo data set at evenly spaced length
    quantiles (13 to 281 characters) and 4 long ones (an e-mail-sized 500-1000 characters)."""
    from training.demo import load_dataset

    rows = sorted(load_dataset(), key=lambda r: (len(r["text"]), r["text"]))
    picks = [rows[round(i * (len(rows) - 1) / 51)]["text"] for i in range(52)]
    longs = []
    for k in range(4):
        parts = [rows[(k * 97 + j * 31) % len(rows)]["text"] for j in range(4 + 2 * k)]
        longs.append(" ".join(parts))
    mix = picks + longs
    random.Random(seed).shuffle(mix)
    return mix
