"""Dropout that draws a different mask on each device of a context-parallel mesh axis."""

import jax
from flax import linen as nn
from jax import lax


class Dropout(nn.Dropout):
    """`nn.Dropout`, and with `context_axis` (inside `jax.shard_map`, each device holding one
    shard of every sequence) the key folded with the device's index on that axis: every device
    gets the same "dropout" key, which would drop the same positions of every shard.

    Without context_axis it is nn.Dropout exactly (the same key, the same mask).
    """

    context_axis: str | None = None

    @nn.compact
    def __call__(self, inputs, deterministic=None, rng=None):
        dropping = not nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.context_axis is not None and dropping and self.rate > 0 and rng is None:
            rng = jax.random.fold_in(
                self.make_rng(self.rng_collection), lax.axis_index(self.context_axis)
            )
        return super().__call__(inputs, deterministic=deterministic, rng=rng)
