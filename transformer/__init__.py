"""Attention and transformers in JAX/Flax, from Bahdanau attention to block-sparse patterns."""
