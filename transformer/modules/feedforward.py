"""The position-wise feed-forward block: the non-linearity that attention (a weighted average)
lacks. FFN(x) = W_2 act(W_1 x + b_1) + b_2, applied to every position independently."""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from transformer.modules.checks import check_positive_int, check_rate
from transformer.modules.dropout import Dropout

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


class FeedForward(nn.Module):
    """`[batch, length, d_model]` -> `[batch, length, d_model]` through a `d_ff`-wide hidden layer.

    Attributes:
      d_ff: hidden width (2048 in Transformer-base, 4 x d_model).
      activation: a name in ACTIVATIONS ("relu" in the paper).
      dropout_rate: dropout on the hidden activations.
      context_axis: None, or the mesh axis sequences are split over (`LayerConfig`): each
        device then draws its own dropout mask.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    d_ff: int
    activation: str = "relu"
    dropout_rate: float = 0.0
    context_axis: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, inputs, *, deterministic=True):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; allowed: {', '.join(ACTIVATIONS)}."
            )
        check_positive_int("d_ff", self.d_ff)
        check_rate("dropout_rate", self.dropout_rate)
        d_model = inputs.shape[-1]
        hidden = nn.Dense(
            self.d_ff,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="hidden",
        )(inputs)
        hidden = ACTIVATIONS[self.activation](hidden)
        hidden = Dropout(self.dropout_rate, context_axis=self.context_axis)(
            hidden, deterministic=deterministic
        )
        return nn.Dense(
            d_model,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="output",
        )(hidden)
