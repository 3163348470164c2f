"""Inference: generation with the KV cache."""
