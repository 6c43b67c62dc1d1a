"""Evaluation: scores of a model or of masks against the hand masks, the report."""
