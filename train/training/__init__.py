"""The training loop: the `Trainer` and its steps, the time budget, the per-step engine, its messages."""
