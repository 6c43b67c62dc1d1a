"""Training: the run's config, the loop, checkpoints, data parallelism, memory checks, validation, and the dataset with its augmentations."""
