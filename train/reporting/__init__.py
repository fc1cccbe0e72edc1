"""What a run shows: the end-of-run report and the experiment trackers."""
