"""Prediction on new images and into a label store, and its memory estimate."""
