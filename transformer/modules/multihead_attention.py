"""Multi-head attention: project to heads, attend with `dot_product_attention`, project back.

The module owns the parameters (W^Q, W^K, W^V, W^O) and nothing else: the attention itself is the
pure function `transformer.attention.dot_product_attention`, so patterns and implementations
(dense, block-sparse, ...) are chosen by argument, never re-implemented here.

The full call also takes `segment_ids` (packed documents: no query reads another document's
keys) and `positions` (where rotary places each token). With `context_axis` set, self-attention
is ring attention over the devices of that mesh axis (`transformer.attention.ring`).

Besides the full call, these methods serve decoding with a key/value cache: `init_cache` and
`prefill` (a prompt through the training path's attention) make the self-attention cache,
`decode_step` appends one position's keys and values and attends over what its pattern lets it
see (`kv_cache`), and `attend_cached` is cross-attention to keys and values computed once by
`key_value`.
"""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from transformer import patterns
from transformer.attention import dot_product_attention, ring
from transformer.attention.auto import auto_implementation
from transformer.attention.soft_cap import check_logit_soft_cap
from transformer.modules import kv_cache
from transformer.modules.checks import check_positive_int, check_positive_number, check_rate
from transformer.modules.positional import (
    alibi_slopes,
    apply_rotary,
    check_positional,
    default_positions,
)


def check_num_kv_heads(num_kv_heads, num_heads):
    """Raises a ValueError unless num_kv_heads is None or a positive int dividing num_heads."""
    if num_kv_heads is None:
        return
    if (
        isinstance(num_kv_heads, bool)
        or not isinstance(num_kv_heads, int)
        or num_kv_heads < 1
        or num_heads % num_kv_heads
    ):
        raise ValueError(
            f"num_kv_heads must be None (= num_heads) or a positive int dividing num_heads "
            f"{num_heads}; got {num_kv_heads!r}. Allowed: "
            f"{[n for n in range(1, num_heads + 1) if num_heads % n == 0]}."
        )


def check_context(context_axis, context_order):
    """Raises a ValueError unless context_axis is None or a mesh axis name and context_order is
    one of `ring.ORDERS`."""
    if context_axis is not None and (not isinstance(context_axis, str) or not context_axis):
        raise ValueError(
            f"context_axis must be None or the name of a mesh axis (e.g. 'context'); got "
            f"{context_axis!r}."
        )
    if context_order not in ring.ORDERS:
        raise ValueError(
            f"unknown context_order {context_order!r}; allowed: {', '.join(ring.ORDERS)}."
        )


class MultiHeadAttention(nn.Module):
    """Self-attention (`inputs_kv` omitted) or cross-attention (queries from one sequence, keys
    and values from another), with heads in their own dimension.

    Attributes:
      num_heads: number of (query) heads h.
      num_kv_heads: number of key/value heads, dividing num_heads; None means num_heads
        (multi-head attention), 1 is multi-query attention, anything between grouped-query
        attention (query head n reads key/value head n // (num_heads // num_kv_heads)). The
        key and value projections and the decoding cache have num_kv_heads heads.
      features: size of the output (d_model); head_dim defaults to features / h.
      head_dim: size of each head's queries, keys and values.
      dropout_rate: dropout on the attention weights (needs a "dropout" rng when not
        deterministic).
      positional: "rotary" rotates queries and keys, "alibi" adds per-head distance penalties;
        any other positional encoding acts outside attention and changes nothing here.
      rotary_base: RoPE's base, 10,000 in the paper.
      pattern: a `transformer.patterns` pattern (which keys each query may see, for example
        `causal()`), or None for full attention.
      implementation: passed to `dot_product_attention`: "auto" picks by backend, pattern and
        length; "dense" is the reference and the only one with attention dropout and weights.
      use_bias: biases in the four projections (the paper has them).
      scale_scores: True: scores q.k / sqrt(head_dim), as in the paper; False: q.k unscaled (an
        ablation: at large head_dim the softmax saturates).
      logit_soft_cap: None, or c > 0: the scaled scores s become c * tanh(s / c) (Gemma 2).
      attention_sinks: a learnable sink logit per head, parameter "sinks" `[heads]`, in every
        query's softmax denominator with a zero value (gpt-oss). Initialised to 0, the logit of
        a key orthogonal to the query: at the start a query gives the sink the weight of one
        average key, and the sink's gradient is not zero, so it learns how much weight to take
        (a sink starting at -inf would have weight 0 and gradient 0, and never move).
      sow_weights: store the attention weights `[batch, heads, q_len, kv_len]` in the
        "intermediates" collection under "attention_weights", for plots (dense only).
      context_axis, context_order: None, or the mesh axis (inside `jax.shard_map`) the sequence
        is split over, in "contiguous" or "zigzag" order: self-attention is then
        `ring.ring_attention` of this device's shard over the whole sequence (`implementation`
        is not used), and rotary's default positions are the shard's global ones.
        Cross-attention and decoding are refused.
      dtype: compute dtype (for example jnp.bfloat16); param_dtype: parameter dtype.
    """

    num_heads: int
    features: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    dropout_rate: float = 0.0
    positional: str = "none"
    rotary_base: float = 10_000.0
    pattern: Any = None
    implementation: str = "auto"
    use_bias: bool = True
    scale_scores: bool = True
    logit_soft_cap: float | None = None
    attention_sinks: bool = False
    sow_weights: bool = False
    context_axis: str | None = None
    context_order: str = "contiguous"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    def setup(self):
        check_positional(self.positional)
        check_positive_int("num_heads", self.num_heads)
        check_num_kv_heads(self.num_kv_heads, self.num_heads)
        check_positive_int("features", self.features)
        check_positive_int("head_dim", self.head_dim, allow_none=True)
        check_rate("dropout_rate", self.dropout_rate)
        check_positive_number("rotary_base", self.rotary_base)
        for name in ("scale_scores", "attention_sinks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        check_logit_soft_cap(self.logit_soft_cap)
        check_context(self.context_axis, self.context_order)
        if self.head_dim is None and self.features % self.num_heads:
            raise ValueError(
                f"features {self.features} is not divisible by num_heads "
                f"{self.num_heads}; set head_dim explicitly."
            )

        def projection(features, axis=-1):
            return nn.DenseGeneral(
                features,
                axis=axis,
                use_bias=self.use_bias,
                kernel_init=self.kernel_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

        head_dim = self.head_dim or self.features // self.num_heads
        # [batch, length, features] -> [batch, length, heads or kv_heads, head_dim]
        self.query = projection((self.num_heads, head_dim))
        self.key = projection((self._kv_heads(), head_dim))
        self.value = projection((self._kv_heads(), head_dim))
        # W^O mixes the heads back into one vector per position.
        self.out = projection(self.features, axis=(-2, -1))
        if self.attention_sinks:
            self.sinks = self.param(
                "sinks", nn.initializers.zeros_init(), (self.num_heads,), self.param_dtype
            )

    def __call__(
        self,
        inputs_q,
        inputs_kv=None,
        *,
        key_padding_mask=None,
        deterministic=True,
        pattern=None,
        segment_ids=None,
        positions=None,
    ):
        """Attends from `inputs_q` to `inputs_kv` (to `inputs_q` itself when omitted).

        Args:
          inputs_q: `[batch, q_len, q_features]`.
          inputs_kv: `[batch, kv_len, kv_features]`, or None for self-attention.
          key_padding_mask: boolean `[batch, kv_len]`, True at real (non-padding) keys. Passed on
            as `[batch, 1, 1, kv_len]` so sparse implementations never see a full mask.
          deterministic: no attention dropout when True.
          pattern: this call's pattern instead of the module's (None: the module's), e.g. a
            decoder trained without its causal mask.
          segment_ids: None, or the documents packed in each row: int `[batch, length]` for
            self-attention, a pair (q_segment_ids `[batch, q_len]`, kv_segment_ids
            `[batch, kv_len]`) for cross-attention. A query attends only to keys of its own
            segment.
          positions: self-attention only: int `[batch, length]` (or `[length]`), the position of
            each token, at which rotary rotates queries and keys (restarting per document when
            packed). None: 0..length-1, or with `context_axis` the shard's global positions.

        Returns:
          `[batch, q_len, features]`.
        """
        if inputs_kv is not None:
            self._check_cross_attention(positions)
            query, key, value = self._project(inputs_q, inputs_kv)
        else:
            if positions is None and self.context_axis is not None:
                positions = default_positions(
                    inputs_q.shape[1], self.context_axis, self.context_order
                )
            query, key, value = self._project(inputs_q, inputs_q, positions)
        return self._attend(
            query, key, value, key_padding_mask, deterministic, pattern, segment_ids
        )

    def _check_cross_attention(self, positions):
        if self.context_axis is not None:
            raise ValueError(
                f"context_axis={self.context_axis!r} splits one sequence over devices, which "
                "self-attention supports (ring attention); cross-attention under context "
                "parallelism is not supported: set context_axis=None for models with "
                "cross-attention (EncoderDecoder)."
            )
        if positions is not None:
            raise ValueError(
                "positions are for self-attention (queries and keys of one sequence); "
                "cross-attention takes none."
            )

    def _project(self, inputs_q, inputs_kv, positions=None):
        """Queries, keys and values `[batch, length, heads, head_dim]`, rotated when rotary
        (at `positions` `[batch, length]`, default 0..length-1)."""
        query, key, value = self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)
        if self.positional == "rotary":
            query = apply_rotary(query, positions, base=self.rotary_base)
            key = apply_rotary(key, positions, base=self.rotary_base)
        return query, key, value

    def _kv_heads(self):
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def _slopes(self):
        return alibi_slopes(self.num_heads) if self.positional == "alibi" else None

    def _scale(self):
        """The attention function's `scale`: None is its default, 1/sqrt(head_dim)."""
        return None if self.scale_scores else 1.0

    def _extras(self):
        """The soft cap and the sinks, as `dot_product_attention` takes them."""
        return {
            "logit_soft_cap": self.logit_soft_cap,
            "sinks": self.sinks if self.attention_sinks else None,
        }

    def _attend(
        self, query, key, value, key_padding_mask, deterministic, pattern=None, segment_ids=None
    ):
        pattern = pattern or self.pattern
        slopes = self._slopes()
        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        if self.context_axis is not None:
            result = self._ring_attend(
                query, key, value, key_padding_mask, pattern, segment_ids, dropout_rng
            )
            return self.out(result)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :].astype(bool)
        implementation = self.implementation
        if implementation == "auto" and (dropout_rng is not None or self.sow_weights):
            # Only "dense" has attention dropout and weights: take it where "auto" would, and
            # let dot_product_attention refuse clearly where it would not.
            implementation = auto_implementation(
                query,
                key,
                value,
                pattern=pattern or patterns.full(),
                alibi_slopes=slopes,
                key_padding=mask is not None,
                **self._extras(),
            )
        result = dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            scale=self._scale(),
            alibi_slopes=slopes,
            **self._extras(),
            pattern=pattern,
            segment_ids=segment_ids,
            implementation=implementation,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            return_weights=self.sow_weights,
        )
        if self.sow_weights:
            result, weights = result
            self.sow("intermediates", "attention_weights", weights)
        return self.out(result)

    def _ring_attend(self, query, key, value, key_padding_mask, pattern, segment_ids, dropout_rng):
        """Self-attention of this device's shard `[batch, shard_len, heads, head_dim]` over the
        whole sequence split on `context_axis`: `ring.ring_attention`."""
        if dropout_rng is not None or self.sow_weights:
            raise ValueError(
                f"context_axis={self.context_axis!r}: ring attention computes neither attention "
                "dropout nor attention weights; set attention_dropout_rate=0 (or call with "
                "deterministic=True) and sow_attention_weights=False."
            )
        # Only what is set, so that ring attention refuses clearly what it does not compute.
        extras = {
            name: value
            for name, value in {**self._extras(), "segment_ids": segment_ids}.items()
            if value is not None
        }
        return ring.ring_attention(
            query,
            key,
            value,
            pattern=pattern,
            axis_name=self.context_axis,
            order=self.context_order,
            key_valid=None if key_padding_mask is None else key_padding_mask.astype(bool),
            scale=self._scale(),
            alibi_slopes=self._slopes(),
            **extras,
        )

    def _refuse_context_decoding(self):
        if self.context_axis is not None:
            raise ValueError(
                f"context_axis={self.context_axis!r}: decoding with a key/value cache is not "
                "supported under context parallelism (ring attention computes whole sequences "
                "in training and evaluation); decode with a model built with context_axis=None "
                "and the same parameters."
            )

    def key_value(self, inputs_kv):
        """The projected keys and values `[batch, kv_len, kv_heads, head_dim]` of `inputs_kv`, to
        cache once for cross-attention (no positional encoding is applied to them)."""
        return self.key(inputs_kv), self.value(inputs_kv)

    def attend_cached(self, inputs_q, key, value, *, key_padding_mask=None):
        """Cross-attention from `inputs_q` `[batch, q_len, q_features]` to cached keys and values
        from `key_value`; key_padding_mask bool `[batch, kv_len]`. Returns
        `[batch, q_len, features]`. Deterministic: decoding has no dropout."""
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return self.out(
            dot_product_attention(
                self.query(inputs_q), key, value, mask=mask, scale=self._scale(), **self._extras()
            )
        )

    def init_cache(self, batch, max_len):
        """An empty self-attention cache for decoding up to position max_len - 1, laid out for
        this layer's pattern (`kv_cache.plan`: a window keeps a ring of its own size)."""
        self._refuse_context_decoding()
        head_dim = self._head_dim()
        return kv_cache.init(
            self._cache_plan(), batch, max_len, self._kv_heads(), head_dim, self.dtype
        )

    def _head_dim(self):
        return self.head_dim or self.features // self.num_heads

    def _cache_plan(self):
        return kv_cache.plan(self.pattern, self.dtype, self._head_dim())

    def prefill(self, inputs, lengths, max_len, *, key_padding_mask=None):
        """Self-attention over a whole prompt with the training path's attention, and the cache
        that decoding continues from.

        Args:
          inputs: `[batch, prompt_len, features]`, rows right-padded.
          lengths: `[batch]` int32, the real positions of each row; decoding goes on at
            position lengths[b].
          max_len: decoding goes on up to position max_len - 1.
          key_padding_mask: bool `[batch, prompt_len]`, True at real tokens.

        Returns:
          `[batch, prompt_len, features]` (the full call's), and the cache.
        """
        self._refuse_context_decoding()
        query, key, value = self._project(inputs, inputs)
        out = self._attend(query, key, value, key_padding_mask, deterministic=True)
        return out, kv_cache.from_prompt(self._cache_plan(), key, value, lengths, max_len)

    def decode_step(self, inputs_q, cache, positions):
        """Causal self-attention for one new position per row, given the cache of the earlier
        ones.

        Args:
          inputs_q: `[batch, 1, q_features]`.
          cache: from `init_cache`, `prefill` or the previous step.
          positions: `[batch]` int32, each row's position of the new input.

        Returns:
          `[batch, 1, features]`, equal to the full call's at those positions, and the cache
          with the new keys and values written in. The step reads what the pattern lets the
          query see (module `kv_cache`), never a `[max_len, max_len]` mask.
        """
        self._refuse_context_decoding()
        query, key, value = self._project(inputs_q, inputs_q, positions[:, None])
        if not self.scale_scores:
            # The cache's attention always divides by sqrt(head_dim): undo it on the query.
            query = query * jnp.asarray(self._head_dim() ** 0.5, query.dtype)
        result, cache = kv_cache.step(
            self._cache_plan(),
            cache,
            query,
            key,
            value,
            positions,
            self._slopes(),
            **self._extras(),
        )
        return self.out(result), cache
