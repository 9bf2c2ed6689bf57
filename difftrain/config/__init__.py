"""Config schemas and validation (pure Python: no torch import)."""
