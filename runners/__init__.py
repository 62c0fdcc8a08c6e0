"""Runner kinds: loading a resolved model version and predicting with it."""

from runners.artifacts import ArtifactStore
from runners.base import Runner
from runners.kinds import register_runner
from runners.text import TextClassificationRunner

__all__ = ["ArtifactStore", "Runner", "TextClassificationRunner", "register_runner"]
