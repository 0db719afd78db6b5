"""Evaluation beyond loss and accuracy: translation with BLEU, and alignment heatmaps."""
