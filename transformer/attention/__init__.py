"""Attention as pure functions of arrays: scores, masks and `dot_product_attention`."""

from transformer.attention.auto import auto_implementation, choose_implementation
from transformer.attention.block_sparse import block_sparse_attention
from transformer.attention.chunked import chunked_attention
from transformer.attention.dense import alibi_bias, dense_attention
from transformer.attention.dot_product import IMPLEMENTATIONS, dot_product_attention
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
from transformer.attention.splash import splash_attention
from transformer.attention.xla import cudnn_attention, xla_attention
