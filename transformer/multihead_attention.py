"""Multi-head attention: project to heads, attend with `dot_product_attention`, project back.

The module owns the parameters (W^Q, W^K, W^V, W^O) and nothing else: the attention itself is the
pure function `transformer.attention.dot_product_attention`, so patterns and implementations
(dense, block-sparse, ...) are chosen by argument, never re-implemented here.
"""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from transformer.attention import dot_product_attention
from transformer.positional import alibi_slopes, apply_rotary, check_positional


class MultiHeadAttention(nn.Module):
    """Self-attention (`inputs_kv` omitted) or cross-attention (queries from one sequence, keys
    and values from another), with heads in their own dimension.

    Attributes:
      num_heads: number of heads h; `head_dim` defaults to features / h.
      head_dim: size of each head's queries, keys and values.
      out_features: size of the output; defaults to the last dimension of `inputs_q`.
      dropout_rate: dropout on the attention weights (needs a "dropout" rng when not
        deterministic).
      positional: "rotary" rotates queries and keys, "alibi" adds per-head distance penalties;
        any other positional encoding acts outside attention and changes nothing here.
      rotary_base: RoPE's base, 10,000 in the paper.
      pattern: a `transformer.patterns` pattern (which keys each query may see, for example
        `causal()`), or None for full attention.
      implementation: passed to `dot_product_attention` ("dense" is the reference).
      use_bias: biases in the four projections (the paper has them).
      sow_weights: store the attention weights `[batch, heads, q_len, kv_len]` in the
        "intermediates" collection under "attention_weights", for plots (dense only).
      dtype: compute dtype (for example jnp.bfloat16); param_dtype: parameter dtype.
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    positional: str = "none"
    rotary_base: float = 10_000.0
    pattern: Any = None
    implementation: str = "dense"
    use_bias: bool = True
    sow_weights: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, *, key_padding_mask=None, deterministic=True):
        """Attends from `inputs_q` to `inputs_kv` (to `inputs_q` itself when omitted).

        Args:
          inputs_q: `[batch, q_len, features]`.
          inputs_kv: `[batch, kv_len, kv_features]`, or None for self-attention.
          key_padding_mask: boolean `[batch, kv_len]`, True at real (non-padding) keys. Passed on
            as `[batch, 1, 1, kv_len]` so sparse implementations never see a full mask.
          deterministic: no attention dropout when True.

        Returns:
          `[batch, q_len, out_features]`.
        """
        check_positional(self.positional)
        if inputs_kv is None:
            inputs_kv = inputs_q
        features = inputs_q.shape[-1]
        head_dim = self.head_dim or features // self.num_heads
        if self.head_dim is None and features % self.num_heads:
            raise ValueError(f"features {features} is not divisible by num_heads "
                             f"{self.num_heads}; set head_dim explicitly.")

        def project(name, x):  # [batch, length, features] -> [batch, length, heads, head_dim]
            return nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.use_bias,
                                   kernel_init=self.kernel_init, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)(x)

        query = project("query", inputs_q)
        key = project("key", inputs_kv)
        value = project("value", inputs_kv)

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

        result = dot_product_attention(
            query, key, value, mask=mask, alibi_slopes=slopes, pattern=self.pattern,
            implementation=self.implementation, dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng, return_weights=self.sow_weights)
        if self.sow_weights:
            result, weights = result
            self.sow("intermediates", "attention_weights", weights)

        # W^O mixes the heads back into one vector per position.
        return nn.DenseGeneral(self.out_features or features, axis=(-2, -1),
                               use_bias=self.use_bias, kernel_init=self.kernel_init,
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               name="out")(result)
