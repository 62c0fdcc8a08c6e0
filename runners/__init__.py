"""Loading a resolved model version and predicting with it."""

from runners.artifacts import ArtifactStore
from runners.runner import TextClassificationRunner

__all__ = ["ArtifactStore", "TextClassificationRunner"]
