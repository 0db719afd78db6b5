"""One step of each recurrent decoder: the bottleneck, Bahdanau attention and Luong attention.

Each decoder is a Flax module called once per target position:

    new_state, (features, weights) = decoder(state, embedded, memory, train=...)

embedded: `[batch, embed_dim]`, the previous target token's embedding; memory: the
`EncoderMemory`; features: `[batch, hidden_dim]`, which the model's output layer turns into
logits; weights: `[batch, src_len]` attention weights, zero on padding (None without attention).
`initial_state(memory)` is the state before the first step. The attention maths are the pure
score functions of `transformer.attention`; the modules only own their parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer.attention import additive_score, dot_score, general_score
from transformer.modules.rnn.encoder import CELLS, hidden_of


def attend(scores, states, mask):
    """Softmax over real source positions, then the weighted sum of the encoder states.

    scores: `[batch, src_len]`; states: `[batch, src_len, dim]`; mask: `[batch, src_len]`.
    Returns context `[batch, dim]` and weights `[batch, src_len]`, exactly 0 on padding (and
    all 0 for a source without a real token).
    """
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("bs,bsd->bd", weights, states), weights


class StackedCells(nn.Module):
    """`num_layers` cells, dropout between them. The carry is a tuple with one entry per layer."""

    hidden_dim: int
    cell: str
    num_layers: int
    dropout_rate: float

    @nn.compact
    def __call__(self, carries, x, *, train):
        new_carries = []
        for layer, carry in enumerate(carries):
            if layer > 0:
                x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
            carry, x = CELLS[self.cell](self.hidden_dim, name=f"cell_{layer}")(carry, x)
            new_carries.append(carry)
        return tuple(new_carries), x


class AdditiveScore(nn.Module):
    """Parameters of v^T tanh(W_s s + W_h h); the maths is `additive_score`."""

    attention_dim: int

    @nn.compact
    def __call__(self, query, keys):
        """query `[batch, d_q]`, keys `[batch, src_len, d_k]` -> scores `[batch, src_len]`."""
        init = nn.initializers.lecun_normal()
        query_weight = self.param("query_weight", init, (query.shape[-1], self.attention_dim))
        key_weight = self.param("key_weight", init, (keys.shape[-1], self.attention_dim))
        v = self.param("v", nn.initializers.normal(self.attention_dim**-0.5), (self.attention_dim,))
        return additive_score(query[:, None], keys, query_weight, key_weight, v)[:, 0]


class GeneralScore(nn.Module):
    """Parameters of Luong's s^T W h; the maths is `general_score`."""

    @nn.compact
    def __call__(self, query, keys):
        weight = self.param(
            "weight", nn.initializers.lecun_normal(), (query.shape[-1], keys.shape[-1])
        )
        return general_score(query[:, None], keys, weight)[:, 0]


class DotScore(nn.Module):
    """Luong's s^T h: no parameters, needs the decoder and encoder states to be equally wide."""

    def __call__(self, query, keys):
        if query.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"the 'dot' score needs decoder hidden {query.shape[-1]} == encoder "
                f"state width {keys.shape[-1]}; use 'general' or 'concat'."
            )
        return dot_score(query[:, None], keys)[:, 0]


# Luong et al. (2015) call the additive score "concat".
LUONG_SCORES = {
    "dot": lambda attention_dim, name: DotScore(name=name),
    "general": lambda attention_dim, name: GeneralScore(name=name),
    "concat": lambda attention_dim, name: AdditiveScore(attention_dim, name=name),
}


class BottleneckDecoder(nn.Module):
    """Sutskever et al. (2014): starts from the encoder's final carry and never looks back.

    The whole source must squeeze through that one state: the information bottleneck.
    """

    hidden_dim: int
    cell: str = "lstm"
    num_layers: int = 1
    dropout_rate: float = 0.0

    def initial_state(self, memory):
        return memory.final

    @nn.compact
    def __call__(self, state, embedded, memory, *, train=False):
        state, output = StackedCells(
            self.hidden_dim, self.cell, self.num_layers, self.dropout_rate, name="cells"
        )(state, embedded, train=train)
        return state, (output, None)


class BahdanauDecoder(nn.Module):
    """Bahdanau et al. (2015): the previous state s_{i-1} scores every source state additively;
    the context c_i joins the input of the recurrent step, s_i = f(s_{i-1}, [y_{i-1}; c_i]);
    features = tanh(W [s_i; c_i; y_{i-1}]), a one-layer version of the paper's deep output.
    """

    hidden_dim: int
    cell: str = "lstm"
    num_layers: int = 1
    attention_dim: int = 128
    dropout_rate: float = 0.0

    def initial_state(self, memory):
        return memory.final

    @nn.compact
    def __call__(self, state, embedded, memory, *, train=False):
        query = hidden_of(state[-1])
        scores = AdditiveScore(self.attention_dim, name="score")(query, memory.states)
        context, weights = attend(scores, memory.states, memory.mask)
        state, output = StackedCells(
            self.hidden_dim, self.cell, self.num_layers, self.dropout_rate, name="cells"
        )(state, jnp.concatenate([embedded, context], -1), train=train)
        features = nn.tanh(
            nn.Dense(self.hidden_dim, name="deep_output")(
                jnp.concatenate([output, context, embedded], -1)
            )
        )
        return state, (features, weights)


class LuongDecoder(nn.Module):
    """Luong et al. (2015), global attention: the new state h_t scores every source state (dot,
    general or concat), the context c_t is concatenated with h_t and h~_t = tanh(W_c [c_t; h_t])
    goes to the output layer. With input feeding, h~_{t-1} joins the next step's input.
    The state is (carries, h~_{t-1}).
    """

    hidden_dim: int
    cell: str = "lstm"
    num_layers: int = 1
    score: str = "general"
    input_feeding: bool = True
    attention_dim: int = 128
    dropout_rate: float = 0.0

    def initial_state(self, memory):
        batch = memory.states.shape[0]
        return memory.final, jnp.zeros((batch, self.hidden_dim), memory.states.dtype)

    @nn.compact
    def __call__(self, state, embedded, memory, *, train=False):
        if self.score not in LUONG_SCORES:
            raise ValueError(
                f"unknown Luong score {self.score!r}; allowed: {sorted(LUONG_SCORES)}."
            )
        carries, previous_attentional = state
        x = embedded
        if self.input_feeding:
            x = jnp.concatenate([embedded, previous_attentional], -1)
        carries, output = StackedCells(
            self.hidden_dim, self.cell, self.num_layers, self.dropout_rate, name="cells"
        )(carries, x, train=train)
        scores = LUONG_SCORES[self.score](self.attention_dim, "score")(output, memory.states)
        context, weights = attend(scores, memory.states, memory.mask)
        attentional = nn.tanh(
            nn.Dense(self.hidden_dim, use_bias=False, name="combine")(
                jnp.concatenate([context, output], -1)
            )
        )
        return (carries, attentional), (attentional, weights)


DECODERS = {
    "none": BottleneckDecoder,
    "bahdanau": BahdanauDecoder,
    "luong": LuongDecoder,
}
