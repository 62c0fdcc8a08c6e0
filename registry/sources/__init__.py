"""One module per registry layer, all behind `RegistrySource` (base.py)."""
