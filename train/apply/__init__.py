"""Applying a trained model: inference, post-processing, `train predict` and `train evaluate`."""
