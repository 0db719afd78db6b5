"""Transformer layers: attention and feed-forward sublayers, each inside a residual connection
with layer normalisation, post-LN (as in "Attention Is All You Need") or pre-LN.

  post-LN: x = LayerNorm(x + Dropout(sublayer(x)))     the paper; needs learning-rate warmup
  pre-LN:  x = x + Dropout(sublayer(LayerNorm(x)))     trains deep stacks without warmup; the
                                                       stack then ends with a final LayerNorm
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from transformer.feedforward import ACTIVATIONS, FeedForward
from transformer.multihead_attention import MultiHeadAttention
from transformer.positional import check_positional


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """What every encoder and decoder layer of a stack shares.

    Attributes:
      num_heads, head_dim: attention heads (head_dim defaults to d_model / num_heads).
      d_ff, activation: the feed-forward block.
      dropout_rate: on each sublayer's output before the residual sum (and on the embeddings).
      attention_dropout_rate: on the attention weights.
      norm_position: "post" or "pre" (see the module docstring).
      layer_norm_epsilon: LayerNorm's epsilon.
      positional: the model's positional encoding; "rotary" and "alibi" act in self-attention.
      rotary_base: RoPE's base.
      implementation: the `dot_product_attention` implementation.
      sow_attention_weights: store attention weights in "intermediates" (dense only).
      dtype, param_dtype: compute and parameter dtypes.
    """

    num_heads: int = 8
    head_dim: int | None = None
    d_ff: int = 2048
    activation: str = "relu"
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    norm_position: str = "post"
    layer_norm_epsilon: float = 1e-6
    positional: str = "sinusoidal"
    rotary_base: float = 10_000.0
    implementation: str = "dense"
    sow_attention_weights: bool = False
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        # Strings ("bfloat16") come from config files; modules want dtypes.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        check_positional(self.positional)
        for name, value, allowed in (("norm_position", self.norm_position, NORM_POSITIONS),
                                     ("activation", self.activation, ACTIVATIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}.")
        for name in ("num_heads", "d_ff"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got "
                                 f"{getattr(self, name)!r}.")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)!r}.")


def post_ln(x, sublayer, norm, dropout):
    """LayerNorm(x + Dropout(sublayer(x))): the paper's order."""
    return norm(x + dropout(sublayer(x)))


def pre_ln(x, sublayer, norm, dropout):
    """x + Dropout(sublayer(LayerNorm(x))): the residual path stays an identity."""
    return x + dropout(sublayer(norm(x)))


NORM_POSITIONS = {"post": post_ln, "pre": pre_ln}


def residual(config, x, sublayer, *, deterministic, name):
    """Wraps `sublayer` (a function of `[batch, length, d_model]`) in a residual connection with
    layer norm, placed as `config.norm_position` says. Call inside a compact method: the
    LayerNorm, named `name`, becomes a submodule of the caller."""
    norm = nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.dtype,
                        param_dtype=config.param_dtype, name=name)

    def dropout(y):
        return nn.Dropout(config.dropout_rate)(y, deterministic=deterministic)

    return NORM_POSITIONS[config.norm_position](x, sublayer, norm, dropout)


def _attention(config, pattern, positional, name):
    return MultiHeadAttention(
        num_heads=config.num_heads, head_dim=config.head_dim,
        dropout_rate=config.attention_dropout_rate, positional=positional,
        rotary_base=config.rotary_base, pattern=pattern, implementation=config.implementation,
        sow_weights=config.sow_attention_weights, dtype=config.dtype,
        param_dtype=config.param_dtype, name=name)


def _feed_forward(config):
    return FeedForward(d_ff=config.d_ff, activation=config.activation,
                       dropout_rate=config.dropout_rate, dtype=config.dtype,
                       param_dtype=config.param_dtype, name="feed_forward")


class EncoderLayer(nn.Module):
    """Self-attention, then feed-forward. `[batch, length, d_model]` -> same shape.

    Attributes:
      config: a LayerConfig.
      pattern: the self-attention pattern of this layer (a `transformer.patterns` pattern, or
        None for full attention).
    """

    config: LayerConfig
    pattern: Any = None

    @nn.compact
    def __call__(self, x, padding_mask=None, *, deterministic=True):
        """x: `[batch, length, d_model]`; padding_mask: bool `[batch, length]`, True at real
        tokens (padding is never attended to)."""
        attention = _attention(self.config, self.pattern, self.config.positional,
                               "self_attention")
        x = residual(self.config, x,
                     lambda h: attention(h, key_padding_mask=padding_mask,
                                         deterministic=deterministic),
                     deterministic=deterministic, name="self_attention_norm")
        feed_forward = _feed_forward(self.config)
        return residual(self.config, x, lambda h: feed_forward(h, deterministic=deterministic),
                        deterministic=deterministic, name="feed_forward_norm")


class DecoderLayer(nn.Module):
    """Masked self-attention, then cross-attention to the encoder (when given), then
    feed-forward. `[batch, length, d_model]` -> same shape.

    Attributes:
      config: a LayerConfig.
      pattern: the self-attention pattern of this layer; a decoder passes one that includes
        `causal()`. Cross-attention is always full (over the real encoder positions) and uses
        no positional encoding: decoder and encoder positions are not comparable.
    """

    config: LayerConfig
    pattern: Any = None

    @nn.compact
    def __call__(self, x, padding_mask=None, encoded=None, encoded_padding_mask=None, *,
                 deterministic=True):
        """x: `[batch, length, d_model]`; padding_mask: bool `[batch, length]`;
        encoded: `[batch, source_length, d_model]` or None (a decoder-only model);
        encoded_padding_mask: bool `[batch, source_length]`, True at real source tokens."""
        self_attention = _attention(self.config, self.pattern, self.config.positional,
                                    "self_attention")
        x = residual(self.config, x,
                     lambda h: self_attention(h, key_padding_mask=padding_mask,
                                              deterministic=deterministic),
                     deterministic=deterministic, name="self_attention_norm")
        if encoded is not None:
            cross_attention = _attention(self.config, None, "none", "cross_attention")
            x = residual(self.config, x,
                         lambda h: cross_attention(h, encoded,
                                                   key_padding_mask=encoded_padding_mask,
                                                   deterministic=deterministic),
                         deterministic=deterministic, name="cross_attention_norm")
        feed_forward = _feed_forward(self.config)
        return residual(self.config, x, lambda h: feed_forward(h, deterministic=deterministic),
                        deterministic=deterministic, name="feed_forward_norm")
