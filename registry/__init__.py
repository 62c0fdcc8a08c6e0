"""Which model version to serve: a chain of registry layers, walked in one place (`resolver.py`)."""

from registry.errors import ModelNotResolvable, RegistryError
from registry.record import LayerAttempt, ModelRecord, Outcome, Resolution, Selector
from registry.resolver import Resolver
from registry.settings import RegistrySettings

__all__ = [
    "LayerAttempt", "ModelNotResolvable", "ModelRecord", "Outcome", "RegistryError",
    "RegistrySettings", "Resolution", "Resolver", "Selector",
]
