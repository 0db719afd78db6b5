"""Evaluation beyond loss and accuracy: translation with BLEU, exact match and token accuracy
of decoded sequences (copy, reversal), both by source length, and alignment heatmaps."""
