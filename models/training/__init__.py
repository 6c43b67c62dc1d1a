"""Training pieces: set criterion, Hungarian matcher, loss weights, point sampling, targets, optimiser."""
