"""The recurrent encoder: embeds the source and runs an LSTM or GRU over it, optionally both ways.

It returns every hidden state (what attention looks at) and the final carry of every layer (all
that the decoder without attention gets to see).
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# Flax's cells; all take and return a carry: (c, h) for the LSTMs, h for the GRU.
CELLS = {
    "lstm": nn.LSTMCell,
    "optimized_lstm": nn.OptimizedLSTMCell,
    "gru": nn.GRUCell,
}


def check_cell(cell):
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; allowed: {sorted(CELLS)}.")


def hidden_of(carry):
    """The hidden state h `[batch, hidden]` inside a cell's carry."""
    return carry[1] if isinstance(carry, tuple) else carry


class EncoderMemory(NamedTuple):
    """What the encoder hands to a decoder.

    states: `[batch, src_len, hidden]`, every top-layer hidden state, zero at padding.
    mask: `[batch, src_len]`, True at real (non-padding) source positions.
    final: one carry per layer, each leaf `[batch, hidden]`: the state after the last real token
      (for a bidirectional layer, the forward and backward final carries concatenated).
    """

    states: jax.Array
    mask: jax.Array
    final: Any


class RNNEncoder(nn.Module):
    """Embedding, then `num_layers` recurrent layers over the source.

    Padding (id 0) is skipped through `seq_lengths`: the final carry is the one after each row's
    last real token, and the backward direction of a bidirectional layer starts at that token.
    A bidirectional layer has hidden_dim // 2 units per direction, so its concatenated states
    have hidden_dim features, as in OpenNMT's `brnn`.
    """

    embed: nn.Module  # token ids -> `[..., embed_dim]`, shared with the caller
    hidden_dim: int
    cell: str = "lstm"
    num_layers: int = 1
    bidirectional: bool = False
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, inputs, *, train=False):
        """inputs: int `[batch, src_len]`, 0 = padding. Returns an `EncoderMemory`."""
        check_cell(self.cell)
        if self.bidirectional and self.hidden_dim % 2:
            raise ValueError(
                f"a bidirectional encoder splits hidden_dim={self.hidden_dim} "
                "between two directions; it must be even."
            )
        mask = inputs != 0
        lengths = mask.sum(axis=-1)
        x = nn.Dropout(self.dropout_rate)(self.embed(inputs), deterministic=not train)
        finals = []
        for layer in range(self.num_layers):
            if layer > 0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
            # The cells own the parameters (named here); nn.RNN only scans them.
            if self.bidirectional:
                make = lambda d, layer=layer: nn.RNN(
                    CELLS[self.cell](self.hidden_dim // 2, name=f"{d}_{layer}")
                )
                rnn = nn.Bidirectional(make("forward"), make("backward"))
                (forward, backward), x = rnn(x, seq_lengths=lengths, return_carry=True)
                final = jax.tree.map(lambda f, b: jnp.concatenate([f, b], -1), forward, backward)
            else:
                rnn = nn.RNN(CELLS[self.cell](self.hidden_dim, name=f"forward_{layer}"))
                final, x = rnn(x, seq_lengths=lengths, return_carry=True)
            # The RNN also stepped over the padding; those outputs mean nothing. A source with
            # no real token has no final state either: give it the zero initial carry.
            x = jnp.where(mask[..., None], x, 0.0)
            finals.append(jax.tree.map(lambda f: jnp.where(lengths[:, None] > 0, f, 0.0), final))
        return EncoderMemory(states=x, mask=mask, final=tuple(finals))
