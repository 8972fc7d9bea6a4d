"""The safety net of a run: non-finite guards, energy-spike recovery, kill-safe checkpoints, DDP glue."""
