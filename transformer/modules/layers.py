"""Transformer layers: attention and feed-forward sublayers, each inside a residual connection
with layer normalisation, post-LN (as in "Attention Is All You Need") or pre-LN.

  post-LN: x = LayerNorm(x + Dropout(sublayer(x)))     the paper; needs learning-rate warmup
  pre-LN:  x = x + Dropout(sublayer(LayerNorm(x)))     trains deep stacks without warmup; the
                                                       stack then ends with a final LayerNorm

Ablation switches of LayerConfig take the fixes out one at a time (docs/models.md, "Ablation
switches"): norm_position "none" (no LayerNorm), residual=False (the sublayer's output replaces x:
x = Dropout(sublayer(x)), normalised after when post-LN), feed_forward=False (no feed-forward
sublayer) and scale_scores=False (scores q.k, not q.k / sqrt(d_k)).
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from transformer.attention.dot_product import SOFT_CAP_AND_SINKS
from transformer.attention.soft_cap import check_logit_soft_cap
from transformer.modules.checks import check_positive_int, check_positive_number, check_rate
from transformer.modules.dropout import Dropout
from transformer.modules.feedforward import ACTIVATIONS, FeedForward
from transformer.modules.multihead_attention import (
    MultiHeadAttention,
    check_context,
    check_num_kv_heads,
)
from transformer.modules.positional import check_positional


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """What every encoder and decoder layer of a stack shares.

    Attributes:
      d_model: width of the residual stream.
      num_heads, head_dim: attention heads (head_dim, a positive int, defaults to
        d_model / num_heads).
      num_kv_heads: key/value heads of every attention layer, dividing num_heads: None (the
        default) is num_heads, 1 multi-query attention, between them grouped-query attention.
        Keys, values and the decoding cache shrink by num_heads / num_kv_heads.
      d_ff, activation: the feed-forward block.
      dropout_rate: on each sublayer's output before the residual sum (and on the embeddings);
        in [0, 1).
      attention_dropout_rate: on the attention weights; in [0, 1).
      norm_position: "post", "pre" (see the module docstring) or "none" (no LayerNorm anywhere,
        an ablation).
      residual: True: each sublayer is added to its input; False (an ablation): its output
        replaces the input.
      feed_forward: False (an ablation): no feed-forward sublayer (and no parameters for it).
      scale_scores: True: attention scores q.k / sqrt(head_dim); False (an ablation): q.k.
      logit_soft_cap: None, or a finite c > 0: every attention layer's scaled scores s become
        c * tanh(s / c) (Gemma 2 uses 50.0).
      attention_sinks: every attention layer learns a sink logit per head (parameter "sinks",
        initialised to 0), which takes part in the softmax with a zero value (gpt-oss).
      layer_norm_epsilon: LayerNorm's epsilon, > 0.
      positional: the model's positional encoding; "rotary" and "alibi" act in self-attention.
      rotary_base: RoPE's base, > 0.
      implementation: the `dot_product_attention` implementation ("auto" picks by backend,
        pattern and length). Attention dropout and sown weights need "dense".
      sow_attention_weights: store attention weights in "intermediates" (dense only).
      context_axis: None, or the mesh axis the sequence is split over (context parallelism):
        the model is called inside `jax.shard_map` on one shard of each sequence, every
        self-attention layer runs `ring.ring_attention` over that axis (instead of
        `implementation`), and default positions are the shard's global positions.
        Cross-attention, attention dropout, sown weights and decoding are refused.
      context_order: how the sequence is split over context_axis: "contiguous" (device i holds
        the i-th slice) or "zigzag" (`ring.to_zigzag`: balanced for causal patterns).
      dtype, param_dtype: compute and parameter dtypes.
    """

    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 2048
    activation: str = "relu"
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    norm_position: str = "post"
    residual: bool = True
    feed_forward: bool = True
    scale_scores: bool = True
    logit_soft_cap: float | None = None
    attention_sinks: bool = False
    layer_norm_epsilon: float = 1e-6
    positional: str = "sinusoidal"
    rotary_base: float = 10_000.0
    implementation: str = "auto"
    sow_attention_weights: bool = False
    context_axis: str | None = None
    context_order: str = "contiguous"
    dtype: Any = "float32"
    param_dtype: Any = "float32"

    def __post_init__(self):
        # Strings ("bfloat16") come from config files; modules want dtypes.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        check_positional(self.positional)
        check_context(self.context_axis, self.context_order)
        for name, value, allowed in (
            ("norm_position", self.norm_position, NORM_POSITIONS),
            ("activation", self.activation, ACTIVATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}.")
        for name in ("residual", "feed_forward", "scale_scores", "attention_sinks"):
            check_bool(name, getattr(self, name))
        # A float from now on: an int from a config file works too, and the field stays hashable.
        object.__setattr__(self, "logit_soft_cap", check_logit_soft_cap(self.logit_soft_cap))
        if (self.logit_soft_cap is not None or self.attention_sinks) and (
            self.implementation not in SOFT_CAP_AND_SINKS
        ):
            raise ValueError(
                f"logit_soft_cap and attention_sinks are computed by implementations "
                f"{list(SOFT_CAP_AND_SINKS)} only; got implementation={self.implementation!r}."
            )
        for name in ("d_model", "num_heads", "d_ff"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("head_dim", self.head_dim, allow_none=True)
        check_num_kv_heads(self.num_kv_heads, self.num_heads)
        if self.num_kv_heads not in (None, self.num_heads) and self.implementation == "lra_local":
            raise ValueError(
                f"num_kv_heads {self.num_kv_heads} != num_heads {self.num_heads} (grouped-query "
                "attention) is not computed by implementation 'lra_local'; use 'block_sparse'."
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            check_rate(name, getattr(self, name))
        check_positive_number("layer_norm_epsilon", self.layer_norm_epsilon)
        check_positive_number("rotary_base", self.rotary_base)
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by num_heads "
                f"{self.num_heads}; choose num_heads dividing d_model or set "
                "head_dim."
            )


def check_bool(name, value):
    """`value` is True or False: a switch from a config file, where 0 or "no" is a typo."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}.")


def post_ln(x, sublayer, norm, dropout, residual=True):
    """LayerNorm(x + Dropout(sublayer(x))): the paper's order."""
    return norm(_skip(x, residual) + dropout(sublayer(x)))


def pre_ln(x, sublayer, norm, dropout, residual=True):
    """x + Dropout(sublayer(LayerNorm(x))): the residual path stays an identity."""
    return _skip(x, residual) + dropout(sublayer(norm(x)))


def no_ln(x, sublayer, norm, dropout, residual=True):
    """x + Dropout(sublayer(x)): no normalisation at all (`norm` is never called)."""
    del norm
    return _skip(x, residual) + dropout(sublayer(x))


def _skip(x, residual):
    """What the residual connection carries past the sublayer: x, or nothing without it."""
    return x if residual else jnp.zeros_like(x)


NORM_POSITIONS = {"post": post_ln, "pre": pre_ln, "none": no_ln}


def sublayer_connection(config, dropout):
    """(x, sublayer, norm) -> the layer's new x, wired as the config says: norm_position,
    residual, and `dropout` on the sublayer's output."""
    wire = NORM_POSITIONS[config.norm_position]
    return lambda x, sublayer, norm: wire(x, sublayer, norm, dropout, config.residual)


def layer_norm(config, name=None):
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


def attention(config, pattern, positional, name=None):
    return MultiHeadAttention(
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        features=config.d_model,
        head_dim=config.head_dim,
        dropout_rate=config.attention_dropout_rate,
        positional=positional,
        rotary_base=config.rotary_base,
        pattern=pattern,
        implementation=config.implementation,
        scale_scores=config.scale_scores,
        logit_soft_cap=config.logit_soft_cap,
        attention_sinks=config.attention_sinks,
        sow_weights=config.sow_attention_weights,
        context_axis=config.context_axis,
        context_order=config.context_order,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


def feed_forward(config, name=None):
    return FeedForward(
        d_ff=config.d_ff,
        activation=config.activation,
        dropout_rate=config.dropout_rate,
        context_axis=config.context_axis,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


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
    def __call__(
        self, x, padding_mask=None, *, deterministic=True, segment_ids=None, positions=None
    ):
        """x: `[batch, length, d_model]`; padding_mask: bool `[batch, length]`, True at real
        tokens (padding is never attended to); segment_ids: int `[batch, length]` or None, the
        document of each token of a packed row (no token attends across documents); positions:
        int `[batch, length]` or None, each token's position, where rotary rotates."""
        config = self.config
        add = sublayer_connection(
            config,
            Dropout(
                config.dropout_rate,
                deterministic=deterministic,
                context_axis=config.context_axis,
            ),
        )
        self_attention = attention(config, self.pattern, config.positional, "self_attention")
        x = add(
            x,
            lambda h: self_attention(
                h,
                key_padding_mask=padding_mask,
                deterministic=deterministic,
                segment_ids=segment_ids,
                positions=positions,
            ),
            layer_norm(config, "self_attention_norm"),
        )
        if not config.feed_forward:
            return x
        ff = feed_forward(config, "feed_forward")
        return add(
            x, lambda h: ff(h, deterministic=deterministic), layer_norm(config, "feed_forward_norm")
        )


class DecoderLayer(nn.Module):
    """Masked self-attention, then cross-attention to the encoder (when given), then
    feed-forward. `[batch, length, d_model]` -> same shape.

    Attributes:
      config: a LayerConfig.
      pattern: the self-attention pattern of this layer; a decoder passes one that includes
        `causal()`.
      training_pattern: the self-attention pattern in training (not deterministic), when it
        differs from `pattern`: a decoder trained without its causal mask (an ablation) passes
        `pattern` without `causal()`. None: `pattern`.
      Cross-attention is always full (over the real encoder positions) and uses no positional
      encoding: decoder and encoder positions are not comparable.

    `init_cache` (or `prefill`, a whole prompt at once) and `decode_step` run the layer one
    position at a time with a key/value cache.
    """

    config: LayerConfig
    pattern: Any = None
    training_pattern: Any = None

    def setup(self):
        config = self.config
        self.self_attention = attention(config, self.pattern, config.positional)
        self.self_attention_norm = layer_norm(config)
        # Created only when called: a decoder-only layer has no cross-attention parameters.
        self.cross_attention = attention(config, None, "none")
        self.cross_attention_norm = layer_norm(config)
        self.feed_forward = feed_forward(config)
        self.feed_forward_norm = layer_norm(config)
        self.dropout = Dropout(config.dropout_rate, context_axis=config.context_axis)

    def _sublayers(self, x, self_attend, cross_attend, deterministic):
        add = sublayer_connection(
            self.config, lambda y: self.dropout(y, deterministic=deterministic)
        )
        x = add(x, self_attend, self.self_attention_norm)
        if cross_attend is not None:
            x = add(x, cross_attend, self.cross_attention_norm)
        if not self.config.feed_forward:
            return x
        return add(
            x, lambda h: self.feed_forward(h, deterministic=deterministic), self.feed_forward_norm
        )

    def __call__(
        self,
        x,
        padding_mask=None,
        encoded=None,
        encoded_padding_mask=None,
        *,
        deterministic=True,
        segment_ids=None,
        positions=None,
        encoded_segment_ids=None,
    ):
        """x: `[batch, length, d_model]`; padding_mask: bool `[batch, length]`;
        encoded: `[batch, source_length, d_model]` or None (a decoder-only model);
        encoded_padding_mask: bool `[batch, source_length]`, True at real source tokens;
        segment_ids: int `[batch, length]` or None, the document of each token of a packed row;
        positions: int `[batch, length]` or None, each token's position (rotary);
        encoded_segment_ids: int `[batch, source_length]`: with segment_ids, a target token
        attends only to the source tokens of its own segment."""

        pattern = self.pattern
        if not deterministic and self.training_pattern is not None:
            pattern = self.training_pattern

        def self_attend(h):
            return self.self_attention(
                h,
                key_padding_mask=padding_mask,
                deterministic=deterministic,
                pattern=pattern,
                segment_ids=segment_ids,
                positions=positions,
            )

        cross_segment_ids = None
        if segment_ids is not None and encoded_segment_ids is not None:
            cross_segment_ids = (segment_ids, encoded_segment_ids)

        def cross_attend(h):
            return self.cross_attention(
                h,
                encoded,
                key_padding_mask=encoded_padding_mask,
                deterministic=deterministic,
                segment_ids=cross_segment_ids,
            )

        return self._sublayers(
            x, self_attend, None if encoded is None else cross_attend, deterministic
        )

    def init_cache(self, batch, max_len, encoded=None):
        """An empty self-attention cache for positions up to max_len - 1, and the
        cross-attention keys and values of `encoded` `[batch, source_length, d_model]` (when
        given)."""
        cache = {"self": self.self_attention.init_cache(batch, max_len)}
        if encoded is not None:
            key, value = self.cross_attention.key_value(encoded)
            cache["cross"] = {"key": key, "value": value}
        return cache

    def prefill(self, x, padding_mask, lengths, max_len):
        """The full call of a decoder-only layer over a prompt x `[batch, prompt_len, d_model]`
        (rows right-padded, `lengths` `[batch]` real positions), and the cache that decoding
        continues from at position lengths[b]. No dropout."""
        cache = {}

        def self_attend(h):
            out, cache["self"] = self.self_attention.prefill(
                h, lengths, max_len, key_padding_mask=padding_mask
            )
            return out

        return self._sublayers(x, self_attend, None, True), cache

    def decode_step(self, x, cache, positions, encoded_padding_mask=None):
        """x: `[batch, 1, d_model]` at `positions` `[batch]` int32; cache from `init_cache`,
        `prefill` or the previous step. Returns the layer's output there and the updated cache.
        No dropout."""
        new_cache = dict(cache)

        def self_attend(h):
            out, new_cache["self"] = self.self_attention.decode_step(h, cache["self"], positions)
            return out

        def cross_attend(h):
            return self.cross_attention.attend_cached(
                h,
                cache["cross"]["key"],
                cache["cross"]["value"],
                key_padding_mask=encoded_padding_mask,
            )

        x = self._sublayers(x, self_attend, cross_attend if "cross" in cache else None, True)
        return x, new_cache
