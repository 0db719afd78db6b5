"""The recurrent encoder-decoder, with the same contract as the transformer EncoderDecoder.

    logits = model.apply(variables, inputs, targets, train=True, rngs={"dropout": key})

inputs: int `[batch, src_len]`, targets: int `[batch, tgt_len]`, id 0 = padding. The model shifts
the targets right itself (`bos_id` first) and returns logits `[batch, tgt_len, vocab]`, plus the
attention weights `[batch, tgt_len, src_len]` with `return_attention=True`. For decoding,
`init_decode_state` and `decode_step` follow `transformer.decoding`'s state/step protocol.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from transformer.modules.checks import check_positive_int, check_rate
from transformer.modules.rnn.decoders import DECODERS, LUONG_SCORES
from transformer.modules.rnn.encoder import RNNEncoder, check_cell
from transformer.token_ids import BOS_ID


def shift_right(targets, bos_id):
    """`[batch, len]` -> `[batch, len]`: bos_id, then the targets without their last token."""
    return jnp.pad(targets, ((0, 0), (1, 0)), constant_values=bos_id)[:, :-1]


class RNNSeq2Seq(nn.Module):
    """An LSTM/GRU encoder-decoder: attention 'none' (the bottleneck), 'bahdanau' or 'luong'.

    score, input_feeding: Luong only ('dot', 'general' or 'concat'; defaults 'general', True).
    attention_dim: the width of the additive (Bahdanau, Luong 'concat') score.
    max_len: how many tokens `decoding.generate` produces when not told (None: it must be told);
      the training loop sets it from the data, as it does a transformer's max_len.
    A bidirectional encoder gives each direction hidden_dim // 2 units, so encoder states and
    the decoder are hidden_dim wide and the encoder's final carries start the decoder directly.
    """

    vocab_size: int
    embed_dim: int = 64
    hidden_dim: int = 128
    cell: str = "lstm"
    num_layers: int = 1
    bidirectional: bool = False
    attention: str = "luong"
    score: str | None = None
    input_feeding: bool | None = None
    attention_dim: int = 128
    dropout_rate: float = 0.0
    share_embeddings: bool = True
    max_len: int | None = None
    bos_id: int = BOS_ID

    def __post_init__(self):
        self._check_config()  # at construction, so a bad config fails at start-up
        super().__post_init__()

    def setup(self):
        self.source_embed = nn.Embed(self.vocab_size, self.embed_dim)
        self.target_embed = (
            self.source_embed
            if self.share_embeddings
            else nn.Embed(self.vocab_size, self.embed_dim)
        )
        self.encoder = RNNEncoder(
            self.source_embed,
            self.hidden_dim,
            self.cell,
            self.num_layers,
            self.bidirectional,
            self.dropout_rate,
        )
        decoder_options = dict(
            hidden_dim=self.hidden_dim,
            cell=self.cell,
            num_layers=self.num_layers,
            dropout_rate=self.dropout_rate,
        )
        if self.attention in ("bahdanau", "luong"):
            decoder_options["attention_dim"] = self.attention_dim
        if self.attention == "luong":
            decoder_options["score"] = self.score or "general"
            decoder_options["input_feeding"] = (
                True if self.input_feeding is None else self.input_feeding
            )
        self.decoder = DECODERS[self.attention](**decoder_options)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.output_layer = nn.Dense(self.vocab_size)

    def _check_config(self):
        for name in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "attention_dim"):
            check_positive_int(name, getattr(self, name))
        check_rate("dropout_rate", self.dropout_rate)
        if self.attention not in DECODERS:
            raise ValueError(f"unknown attention {self.attention!r}; allowed: {sorted(DECODERS)}.")
        check_cell(self.cell)
        if self.bidirectional and self.hidden_dim % 2:
            raise ValueError(
                f"a bidirectional encoder splits hidden_dim={self.hidden_dim} "
                "between two directions; it must be even."
            )
        if self.attention == "luong" and self.score not in (None, *LUONG_SCORES):
            raise ValueError(
                f"unknown Luong score {self.score!r}; allowed: {sorted(LUONG_SCORES)}."
            )
        if self.attention != "luong" and (self.score, self.input_feeding) != (None, None):
            raise ValueError(
                "score and input_feeding apply to attention='luong' only; got "
                f"attention={self.attention!r}, score={self.score!r}, "
                f"input_feeding={self.input_feeding!r}."
            )
        if self.max_len is not None and not (isinstance(self.max_len, int) and self.max_len >= 1):
            raise ValueError(f"max_len must be a positive integer or None; got {self.max_len!r}.")
        if not 0 < self.bos_id < self.vocab_size:
            raise ValueError(
                f"bos_id must be in [1, vocab_size={self.vocab_size}) (0 is padding); "
                f"got {self.bos_id}."
            )

    def encode(self, inputs, *, train=False):
        """inputs: int `[batch, src_len]` -> `EncoderMemory`."""
        if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(
                f"inputs must be int [batch, src_len]; got {inputs.dtype} {inputs.shape}."
            )
        return self.encoder(inputs, train=train)

    def logits(self, features, *, train=False):
        return self.output_layer(self.dropout(features, deterministic=not train))

    def decode(self, memory, decoder_inputs, *, train=False):
        """Teacher forcing: decoder_inputs int `[batch, tgt_len]` (already shifted right).

        Returns logits `[batch, tgt_len, vocab]` and weights `[batch, tgt_len, src_len]` (None
        without attention).
        """
        embedded = self.dropout(self.target_embed(decoder_inputs), deterministic=not train)

        def step(decoder, state, embedded_t, memory):
            return decoder(state, embedded_t, memory, train=train)

        # One set of parameters for every step, fresh dropout masks at each.
        scan = nn.scan(
            step,
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=(1, nn.broadcast),
            out_axes=1,
        )
        _, (features, weights) = scan(
            self.decoder, self.decoder.initial_state(memory), embedded, memory
        )
        return self.logits(features, train=train), weights

    def __call__(self, inputs, targets, *, train=False, return_attention=False):
        if return_attention and self.attention == "none":
            raise ValueError("attention='none' has no attention weights to return.")
        if targets.ndim != 2 or not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(
                f"targets must be int [batch, tgt_len]; got {targets.dtype} {targets.shape}."
            )
        memory = self.encode(inputs, train=train)
        logits, weights = self.decode(memory, shift_right(targets, self.bos_id), train=train)
        return (logits, weights) if return_attention else logits

    @property
    def max_decode_len(self):
        """The number of tokens `decoding.generate` produces by default."""
        return self.max_len

    def init_decode_state(self, inputs, max_decode_len=None):
        """The decoding state before the first step: the encoder memory and the decoder state.

        max_decode_len is part of the decoding protocol (a transformer sizes its cache with it);
        a recurrent state does not grow with the length, so any length can be decoded."""
        memory = self.encode(inputs)
        return {"memory": memory, "decoder": self.decoder.initial_state(memory)}

    def decode_step(self, state, token, *, train=False):
        """token: int `[batch]`, the previous target token -> (logits `[batch, vocab]`, state)."""
        decoder_state, (features, _) = self.decoder(
            state["decoder"], self.target_embed(token), state["memory"], train=train
        )
        return self.logits(features, train=train), {**state, "decoder": decoder_state}


def build_rnn_seq2seq(model_config):
    """An `RNNSeq2Seq` from a dict or ConfigDict of its fields; unknown fields are an error."""
    if hasattr(model_config, "to_dict"):  # ml_collections.ConfigDict
        model_config = model_config.to_dict()
    fields = dict(model_config)
    allowed = [f.name for f in dataclasses.fields(RNNSeq2Seq) if f.name not in ("parent", "name")]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"RNNSeq2Seq has no field(s) {unknown}; allowed: {sorted(allowed)}.")
    if "vocab_size" not in fields:
        raise ValueError("RNNSeq2Seq needs vocab_size.")
    return RNNSeq2Seq(**fields)
