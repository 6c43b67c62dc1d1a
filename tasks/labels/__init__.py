"""The new class's labels: pseudo-labelling, the merge into a label version, human review."""
