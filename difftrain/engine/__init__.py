"""The training engine: loop, checkpoints, data, models, validation (torch lives here)."""
