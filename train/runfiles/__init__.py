"""What a run writes and others read: checkpoints, the run folder, exported models."""
