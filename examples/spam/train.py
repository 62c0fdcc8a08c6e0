"""Train a TF-IDF + logistic regression spam filter on a generated set and publish it to MLflow.

    MLFLOW_TRACKING_URI=... python examples/spam/train.py [--seed 0]

The data set is generated (templates and fillers), so the example runs offline; a new seed gives a
new version with slightly different weights.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

SPAM = ["WIN a free {prize} now, click {link}", "Congratulations! You have been selected for a {prize}, reply {code}",
        "Cheap {drug} without prescription, order at {link}", "URGENT: your account is locked, verify at {link}",
        "Earn {money} a week from home, no experience, call {code}", "Limited offer: {prize} for only {money}, visit {link}"]
HAM = ["Are we still meeting for {meal} on {day}?", "Here are the notes from {day}'s meeting about {topic}",
       "Can you review my pull request about {topic} before {day}?", "Thanks for the {meal}, see you on {day}",
       "The {topic} report is attached; comments welcome by {day}", "Running ten minutes late for {meal}, sorry"]
FILL = {"prize": ["iPhone", "cruise", "gift card", "car"], "link": ["bit.ly/x1", "win-now.example", "tinyurl.com/ab"],
        "code": ["WIN", "STOP", "YES 55"], "drug": ["pills", "meds"], "money": ["$5000", "$99", "1000 EUR"],
        "meal": ["lunch", "dinner", "coffee"], "day": ["Monday", "Friday", "tomorrow"], "topic": ["the budget", "caching", "hiring"]}


def dataset(seed: int, per_class: int = 60) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for label, templates in (("spam", SPAM), ("ham", HAM)):
        for _ in range(per_class):
            template = rng.choice(templates)
            texts.append(template.format(**{k: rng.choice(v) for k, v in FILL.items()}))
            labels.append(label)
    return texts, labels


def train(seed: int = 0) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts, labels = dataset(seed)
    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression(C=10.0, random_state=seed)).fit(texts, labels)


def publish(settings: Any, name: str = "spam", seed: int = 0) -> Any:
    """Train and publish one version; returns the publisher's result (record, best_moved)."""
    import mlflow.sklearn
    import sklearn

    from training.publisher import Publisher

    pipeline = train(seed)
    texts, labels = dataset(seed + 1000, per_class=20)
    accuracy = float((pipeline.predict(texts) == labels).mean())
    publisher = Publisher(settings)
    try:
        return publisher.publish_logged(
            name,
            lambda registered: mlflow.sklearn.log_model(pipeline, name="model", registered_model_name=registered,
                                                        pip_requirements=[f"scikit-learn=={sklearn.__version__}"]),
            {"accuracy": accuracy, "f1": accuracy}, label="sklearn", params={"seed": seed},
        )
    finally:
        publisher.close()


if __name__ == "__main__":
    from registry.settings import RegistrySettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="spam")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = publish(RegistrySettings.from_env(), args.name, args.seed)
    print(f"published {result.record.name} version {result.record.version} (best moved: {result.best_moved})")
