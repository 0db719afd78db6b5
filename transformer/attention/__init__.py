"""Attention as pure functions of arrays: scores, masks and `dot_product_attention`."""

from transformer.attention.dense import alibi_bias, dense_attention
from transformer.attention.dot_product import dot_product_attention
from transformer.attention.masks import (
    attention_padding_mask,
    causal_mask,
    combine_masks,
    padding_mask_from_lengths,
    padding_mask_from_tokens,
)
from transformer.attention.scores import (
    SCORE_FUNCTIONS,
    additive_score,
    dot_score,
    general_score,
    mean_pool_score,
    scaled_dot_score,
)
