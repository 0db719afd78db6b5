"""Flax Linen modules: multi-head attention, feed-forward, positions, layers, models, the RNN.

They are thin wrappers that own parameters; the maths is in `transformer.attention`.
"""

from transformer.modules.models import CONFIGS, MODELS, TransformerConfig, build_model
