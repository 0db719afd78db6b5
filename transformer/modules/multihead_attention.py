"""Multi-head attention: project to heads, attend with `dot_product_attention`, project back.

The module owns the parameters (W^Q, W^K, W^V, W^O) and nothing else: the attention itself is the
pure function `transformer.attention.dot_product_attention`, so patterns and implementations
(dense, block-sparse, ...) are chosen by argument, never re-implemented here.

Besides the full call, two methods serve step-by-step decoding with a key/value cache:
`decode_step` (self-attention: append this step's keys and values, attend over the cache) and
`attend_cached` (cross-attention to keys and values computed once by `key_value`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer import patterns
from transformer.attention import dot_product_attention
from transformer.attention.auto import auto_implementation
from transformer.modules.checks import check_positive_int, check_positive_number, check_rate
from transformer.modules.positional import alibi_slopes, apply_rotary, check_positional


class MultiHeadAttention(nn.Module):
    """Self-attention (`inputs_kv` omitted) or cross-attention (queries from one sequence, keys
    and values from another), with heads in their own dimension.

    Attributes:
      num_heads: number of heads h.
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
      sow_weights: store the attention weights `[batch, heads, q_len, kv_len]` in the
        "intermediates" collection under "attention_weights", for plots (dense only).
      dtype: compute dtype (for example jnp.bfloat16); param_dtype: parameter dtype.
    """

    num_heads: int
    features: int
    head_dim: int | None = None
    dropout_rate: float = 0.0
    positional: str = "none"
    rotary_base: float = 10_000.0
    pattern: Any = None
    implementation: str = "auto"
    use_bias: bool = True
    sow_weights: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    def setup(self):
        check_positional(self.positional)
        check_positive_int("num_heads", self.num_heads)
        check_positive_int("features", self.features)
        check_positive_int("head_dim", self.head_dim, allow_none=True)
        check_rate("dropout_rate", self.dropout_rate)
        check_positive_number("rotary_base", self.rotary_base)
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

        heads = (self.num_heads, self.head_dim or self.features // self.num_heads)
        # [batch, length, features] -> [batch, length, heads, head_dim]
        self.query, self.key, self.value = projection(heads), projection(heads), projection(heads)
        # W^O mixes the heads back into one vector per position.
        self.out = projection(self.features, axis=(-2, -1))

    def __call__(self, inputs_q, inputs_kv=None, *, key_padding_mask=None, deterministic=True):
        """Attends from `inputs_q` to `inputs_kv` (to `inputs_q` itself when omitted).

        Args:
          inputs_q: `[batch, q_len, q_features]`.
          inputs_kv: `[batch, kv_len, kv_features]`, or None for self-attention.
          key_padding_mask: boolean `[batch, kv_len]`, True at real (non-padding) keys. Passed on
            as `[batch, 1, 1, kv_len]` so sparse implementations never see a full mask.
          deterministic: no attention dropout when True.

        Returns:
          `[batch, q_len, features]`.
        """
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        query, key, value = self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)
        if self.positional == "rotary":
            query = apply_rotary(query, base=self.rotary_base)
            key = apply_rotary(key, base=self.rotary_base)
        slopes = alibi_slopes(self.num_heads) if self.positional == "alibi" else None
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[:, None, None, :].astype(bool)
        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        implementation = self.implementation
        if implementation == "auto" and (dropout_rng is not None or self.sow_weights):
            # Only "dense" has attention dropout and weights: take it where "auto" would, and
            # let dot_product_attention refuse clearly where it would not.
            implementation = auto_implementation(
                query, key, value, pattern=self.pattern or patterns.full(), alibi_slopes=slopes
            )
        result = dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            alibi_slopes=slopes,
            pattern=self.pattern,
            implementation=implementation,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            return_weights=self.sow_weights,
        )
        if self.sow_weights:
            result, weights = result
            self.sow("intermediates", "attention_weights", weights)
        return self.out(result)

    def key_value(self, inputs_kv):
        """The projected keys and values `[batch, kv_len, heads, head_dim]` of `inputs_kv`, to
        cache once for cross-attention (no positional encoding is applied to them)."""
        return self.key(inputs_kv), self.value(inputs_kv)

    def attend_cached(self, inputs_q, key, value, *, key_padding_mask=None):
        """Cross-attention from `inputs_q` `[batch, q_len, q_features]` to cached keys and values
        from `key_value`; key_padding_mask bool `[batch, kv_len]`. Returns
        `[batch, q_len, features]`. Deterministic: decoding has no dropout."""
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        return self.out(dot_product_attention(self.query(inputs_q), key, value, mask=mask))

    def decode_step(self, inputs_q, cache, index):
        """Causal self-attention for the `q_len` new positions index..index+q_len-1, given the
        keys and values of the earlier ones.

        Args:
          inputs_q: `[batch, q_len, q_features]` (q_len is 1 when decoding token by token).
          cache: {"key", "value"}: `[batch, max_len, heads, head_dim]`, filled before `index`.
          index: int32 scalar, the position of the first new input.

        Returns:
          `[batch, q_len, features]`, and the cache with the new keys and values written in.
          Equal to the full causal call on the whole prefix at those positions. Uses dense
          attention (one query row over the cache) and the rows of the pattern's
          `[max_len, max_len]` mask; a random pattern draws its blocks for that key length, so
          it matches a full call of length max_len.
        """
        q_len, max_len = inputs_q.shape[1], cache["key"].shape[1]
        positions = index + jnp.arange(q_len)
        query, key, value = self.query(inputs_q), self.key(inputs_q), self.value(inputs_q)
        if self.positional == "rotary":
            query = apply_rotary(query, positions, base=self.rotary_base)
            key = apply_rotary(key, positions, base=self.rotary_base)
        start = (0, index, 0, 0)
        cache = {
            "key": jax.lax.dynamic_update_slice(
                cache["key"], key.astype(cache["key"].dtype), start
            ),
            "value": jax.lax.dynamic_update_slice(
                cache["value"], value.astype(cache["value"].dtype), start
            ),
        }
        key_positions = jnp.arange(max_len)
        allowed = key_positions[None, :] <= positions[:, None]  # [q_len, max_len]
        if self.pattern is not None:
            pattern_rows = np.asarray(self.pattern.mask(max_len, max_len))
            allowed &= jax.lax.dynamic_slice_in_dim(jnp.asarray(pattern_rows), index, q_len)
        bias = None
        if self.positional == "alibi":
            # ALiBi as an explicit bias: the rows are at positions index.., not at 0.., here.
            distance = jnp.abs(positions[:, None] - key_positions[None, :])
            bias = -jnp.asarray(alibi_slopes(self.num_heads))[None, :, None, None] * distance
        result = dot_product_attention(
            query, cache["key"], cache["value"], mask=allowed[None, None], bias=bias
        )
        return self.out(result), cache
