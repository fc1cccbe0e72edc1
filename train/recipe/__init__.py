"""What a run trains with besides the network: losses, augmentations, learning-rate schedules, the output bias."""
