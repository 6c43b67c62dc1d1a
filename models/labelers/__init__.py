"""Pseudo labelers: Grounded-SAM (ops, weights, offline BERT, embedding cache), simulated, label records."""
