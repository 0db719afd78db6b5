"""Transformer stacks and the models built from them.

  Encoder            bidirectional self-attention layers over embeddings
  Decoder            causal self-attention (+ cross-attention to an encoder) over embeddings
  EncoderClassifier  tokens -> class logits, pooling by [CLS], mean, last token or attention
  DecoderLM          tokens -> next-token logits (decoder-only language model)
  EncoderDecoder     source tokens, target tokens -> target logits (the paper's Transformer)

Build a model from a config with a `name`: `build_model({"name": "decoder_lm", ...})`; the
registry MODELS also builds the recurrent `rnn_seq2seq` (transformer/modules/rnn/). Token id 0 is padding
in every model: it is never attended to and never pooled. Decoders start from BOS_ID (1), as the
RNN does (transformer/token_ids.py).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer import patterns
from transformer.attention import dot_product_attention
from transformer.modules import kv_cache
from transformer.modules.dropout import Dropout
from transformer.modules.layers import (
    DecoderLayer,
    EncoderLayer,
    LayerConfig,
    check_bool,
    layer_norm,
)
from transformer.modules.positional import (
    ADDED_POSITIONAL_ENCODINGS,
    context_shards,
    default_positions,
)
from transformer.modules.rnn import build_rnn_seq2seq
from transformer.patterns import PrefixLM
from transformer.token_ids import BOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class TransformerConfig(LayerConfig):
    """Every model's hyperparameters (the layer fields are documented on LayerConfig).

    Attributes:
      vocab_size: token vocabulary (the source vocabulary of an EncoderDecoder).
      num_layers: encoder layers (EncoderClassifier, EncoderDecoder) or decoder layers
        (DecoderLM).
      max_len: longest input of a "learned" positional encoding, and the number of positions
        a decoding cache holds (`init_decode_state`).
      pattern: the self-attention pattern of every layer, or a schedule of several. Decoders
        intersect each layer's with causal(), or with prefix_lm(n) when it has a prefix_lm(n)
        part, keeping that prefix bidirectional (`decoder_mask`). One of:
        - a name in `transformer.patterns.PATTERNS`, built per layer with
          `patterns.build(pattern, layer=i, **pattern_options)`, so random parts differ by layer;
        - a Pattern object, used in every layer;
        - a schedule: a sequence of entries repeated to the depth, layer i taking entry
          i % len(schedule). An entry is a name (built with pattern_options), a dict
          {"name": name, **options} carrying its own options, or a Pattern. Gemma 3's five local
          layers to one global: `({"name": "sliding_window", "left": 512},) * 5 + ("full",)`.
      pattern_options: keyword arguments of a named pattern (of every name entry of a schedule).
      num_classes, pooling: EncoderClassifier only; pooling is a name in POOLINGS.
      num_decoder_layers, target_vocab_size, share_embeddings: EncoderDecoder only.
        target_vocab_size None means the source vocabulary; share_embeddings uses one embedding
        table for source and target tokens (needs one vocabulary).
      tie_output_embedding: DecoderLM and EncoderDecoder: the output projection is the
        transposed (target) embedding, as in the paper.
      causal_mask_in_training: DecoderLM only. False (an ablation): training attends without
        the causal mask, so it can read the token it predicts; evaluation (train=False) and
        decoding keep the mask.
    """

    vocab_size: int = 32_000
    num_layers: int = 6
    max_len: int = 512
    pattern: Any = "full"
    pattern_options: Any = dataclasses.field(default_factory=dict)
    num_classes: int = 2
    pooling: str = "cls"
    num_decoder_layers: int = 6
    target_vocab_size: int | None = None
    share_embeddings: bool = True
    tie_output_embedding: bool = True
    causal_mask_in_training: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_bool("causal_mask_in_training", self.causal_mask_in_training)
        for name in ("vocab_size", "num_layers", "max_len", "num_classes", "num_decoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; allowed: {', '.join(POOLINGS)}.")
        if self.share_embeddings and self.target_vocab_size not in (None, self.vocab_size):
            raise ValueError(
                f"share_embeddings needs one vocabulary, but target_vocab_size "
                f"{self.target_vocab_size} != vocab_size {self.vocab_size}; set "
                "share_embeddings=False or target_vocab_size=None."
            )
        # jax.jit(model.apply) hashes the module, hence its config: store options as tuples.
        object.__setattr__(self, "pattern_options", _options(self.pattern_options))
        object.__setattr__(self, "pattern", _pattern_or_schedule(self.pattern))
        # Build each entry once now, so that a bad name or option fails at start-up, not at
        # trace time.
        for layer in range(len(self.pattern) if isinstance(self.pattern, tuple) else 1):
            layer_pattern(self, layer, causal=False)


def _hashable(value):
    """Lists (as config files and ConfigDicts give them) as tuples, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    return value


def _options(options):
    """Pattern options as a sorted tuple of (name, value) pairs, lists made tuples."""
    return tuple((name, _hashable(value)) for name, value in sorted(dict(options).items()))


def _entry(entry):
    """One pattern entry as stored: a name, a Pattern, or (name, options) from a dict."""
    if isinstance(entry, (str, patterns.Pattern)):
        return entry
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
        return entry[0], _options(entry[1])  # as stored already (dataclasses.replace)
    if hasattr(entry, "items") and isinstance(dict(entry).get("name"), str):
        options = dict(entry)
        return options.pop("name"), _options(options)
    raise ValueError(
        f"a pattern entry must be a name in {sorted(patterns.PATTERNS)}, a Pattern, or a dict "
        f'{{"name": name, **options}}; got {entry!r}.'
    )


def _pattern_or_schedule(pattern):
    """`pattern` as stored: one entry, or a schedule as a non-empty tuple of entries."""
    if isinstance(pattern, (list, tuple)):
        if not pattern:
            raise ValueError("a pattern schedule needs at least one entry; got an empty one.")
        return tuple(_entry(entry) for entry in pattern)
    if hasattr(pattern, "items"):
        raise ValueError(
            f"pattern {pattern!r}: a single pattern is a name with pattern_options, or a Pattern; "
            "a dict of options is an entry of a schedule (a sequence)."
        )
    return _entry(pattern)


def layer_pattern(config, layer, *, causal):
    """The self-attention pattern of layer `layer`: its schedule's entry, its own random seed,
    intersected with the decoder's mask in decoders (`decoder_mask`)."""
    entry = config.pattern
    if isinstance(entry, tuple):  # a schedule
        entry = entry[layer % len(entry)]
    if isinstance(entry, str):
        pattern = patterns.build(entry, layer=layer, **dict(config.pattern_options))
    elif isinstance(entry, tuple):  # (name, its own options)
        pattern = patterns.build(entry[0], layer=layer, **dict(entry[1]))
    else:
        pattern = entry
    if not causal:
        return pattern
    mask = decoder_mask(pattern)
    if pattern == mask or (isinstance(pattern, patterns.Intersection) and mask in pattern.parts):
        return pattern
    return pattern & mask


def decoder_mask(pattern):
    """What a decoder intersects `pattern` with so that no query sees the future: causal(), or,
    when the pattern has a prefix_lm(n) part, prefix_lm(n) itself (causal() | the n x n prefix
    block), which keeps the prefix bidirectional."""
    lengths = {part.prefix_length for part in _pattern_parts(pattern) if isinstance(part, PrefixLM)}
    if len(lengths) > 1:
        raise ValueError(
            f"pattern {pattern} has prefix_lm parts of lengths {sorted(lengths)}; a decoder "
            "layer takes one prefix length (use a schedule for different lengths per layer)."
        )
    return patterns.prefix_lm(lengths.pop()) if lengths else patterns.causal()


def _pattern_parts(pattern):
    """Every pattern inside `pattern`'s unions and intersections, and itself."""
    parts = getattr(pattern, "parts", ())
    return (pattern,) + tuple(p for part in parts for p in _pattern_parts(part))


def prefix_length(config, num_layers):
    """The longest prefix_lm(n) prefix of a decoder's `num_layers` layers, or 0 if none has
    one."""
    return max(
        getattr(decoder_mask(layer_pattern(config, layer, causal=False)), "prefix_length", 0)
        for layer in range(num_layers)
    )


def positional_encoding(config):
    """The module adding positions to the embeddings, or None when they act in attention."""
    if config.positional not in ADDED_POSITIONAL_ENCODINGS:
        return None
    return ADDED_POSITIONAL_ENCODINGS[config.positional](config.max_len, config.param_dtype)


def token_positions(config, length, positions=None):
    """The positions the added encodings and rotary use: `positions` (int `[batch, length]` or
    `[length]`) when given; else, under context parallelism, this shard's global positions
    `[length]`; else None (0..length-1, each encoding's default)."""
    if positions is not None or config.context_axis is None:
        return positions
    positions = default_positions(length, config.context_axis, config.context_order)
    whole = length * context_shards(config.context_axis)
    if config.positional == "learned" and whole > config.max_len:
        raise ValueError(
            f"sequence length {whole} (shards of {length} over context_axis "
            f"{config.context_axis!r}) exceeds the learned positional embedding's max_len "
            f"{config.max_len}."
        )
    return positions


def add_positions(encoding, x, positions):
    """x `[batch, length, d_model]` plus the added positional encoding at `positions`, or x
    when the encoding acts in attention (`encoding` None)."""
    return x if encoding is None else encoding(x, positions=positions)


class Encoder(nn.Module):
    """Bidirectional stack: positional encoding, `config.num_layers` EncoderLayers, and a final
    LayerNorm when pre-LN.

    Call: `Encoder(config)(embedded, padding_mask, deterministic=True)` with embedded
    `[batch, length, d_model]` and padding_mask bool `[batch, length]` (True at real tokens, or
    None); returns `[batch, length, d_model]`. Packed rows: `segment_ids` int `[batch, length]`
    (the document of each token; none attends across documents) and `positions` int
    `[batch, length]` (each token's position in its document, where every positional encoding
    places it).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self, embedded, padding_mask=None, *, deterministic=True, segment_ids=None, positions=None
    ):
        config = self.config
        positions = token_positions(config, embedded.shape[1], positions)
        x = add_positions(positional_encoding(config), embedded.astype(config.dtype), positions)
        x = Dropout(config.dropout_rate, context_axis=config.context_axis)(
            x, deterministic=deterministic
        )
        for layer in range(config.num_layers):
            x = EncoderLayer(
                config, pattern=layer_pattern(config, layer, causal=False), name=f"layers_{layer}"
            )(
                x,
                padding_mask,
                deterministic=deterministic,
                segment_ids=segment_ids,
                positions=positions,
            )
        if config.norm_position == "pre":
            x = layer_norm(config, "final_norm")(x)
        return x


class Decoder(nn.Module):
    """Causal stack: positional encoding, `num_layers` DecoderLayers (with cross-attention when
    `encoded` is given), and a final LayerNorm when pre-LN.

    Call: `Decoder(config, num_layers)(embedded, padding_mask, encoded=None,
    encoded_padding_mask=None, deterministic=True)` with embedded `[batch, length, d_model]`,
    padding_mask bool `[batch, length]` or None, encoded `[batch, source_length, d_model]` or None,
    encoded_padding_mask bool `[batch, source_length]` or None; returns
    `[batch, length, d_model]`. Output i depends on embedded positions <= i only. Packed rows:
    `segment_ids` and `positions` int `[batch, length]` as in Encoder (and `encoded_segment_ids`
    `[batch, source_length]`: each target token then attends to its own segment's source).

    `init_cache` and `decode_step` compute the same outputs position by position.
    """

    config: TransformerConfig
    num_layers: int

    def setup(self):
        config = self.config
        self.positions = positional_encoding(config)
        self.dropout = Dropout(config.dropout_rate, context_axis=config.context_axis)
        self.layers = [
            DecoderLayer(
                config,
                pattern=layer_pattern(config, layer, causal=True),
                training_pattern=None
                if config.causal_mask_in_training
                else layer_pattern(config, layer, causal=False),
            )
            for layer in range(self.num_layers)
        ]
        self.final_norm = layer_norm(config)  # used (and created) only when pre-LN

    def _final(self, x):
        return self.final_norm(x) if self.config.norm_position == "pre" else x

    def __call__(
        self,
        embedded,
        padding_mask=None,
        encoded=None,
        encoded_padding_mask=None,
        *,
        deterministic=True,
        segment_ids=None,
        positions=None,
        encoded_segment_ids=None,
    ):
        positions = token_positions(self.config, embedded.shape[1], positions)
        x = add_positions(self.positions, embedded.astype(self.config.dtype), positions)
        x = self.dropout(x, deterministic=deterministic)
        for layer in self.layers:
            x = layer(
                x,
                padding_mask,
                encoded,
                encoded_padding_mask,
                deterministic=deterministic,
                segment_ids=segment_ids,
                positions=positions,
                encoded_segment_ids=encoded_segment_ids,
            )
        return self._final(x)

    def init_cache(self, batch, max_len, encoded=None):
        """Per layer: an empty key/value cache for positions up to max_len - 1, and the
        cross-attention keys and values of `encoded` `[batch, source_length, d_model]` when
        given."""
        return [layer.init_cache(batch, max_len, encoded) for layer in self.layers]

    def prefill(self, embedded, padding_mask, lengths, max_len):
        """The full call over a prompt embedded `[batch, prompt_len, d_model]` (rows
        right-padded; `lengths` `[batch]` real positions, padding_mask bool
        `[batch, prompt_len]`) with the training path's attention, and per layer the cache that
        decoding continues from at position lengths[b]. No dropout, no cross-attention."""
        x = embedded.astype(self.config.dtype)
        if self.positions is not None:
            x = self.positions(x)
        cache = []
        for layer in self.layers:
            x, layer_cache = layer.prefill(x, padding_mask, lengths, max_len)
            cache.append(layer_cache)
        return self._final(x), cache

    def decode_step(self, embedded, cache, positions, encoded_padding_mask=None):
        """embedded `[batch, 1, d_model]` at `positions` `[batch]` int32 (each row its own) ->
        (`[batch, 1, d_model]`, updated cache). No dropout."""
        x = embedded.astype(self.config.dtype)
        if self.positions is not None:
            x = self.positions(x, positions=positions[:, None])
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.decode_step(x, layer_cache, positions, encoded_padding_mask)
            new_cache.append(layer_cache)
        return self._final(x), new_cache


def token_embedding(config, vocab_size, name):
    """An embedding table initialised with stddev d_model^-1/2; `embed_tokens` scales it back up
    by sqrt(d_model), as in the paper, so that the embeddings start at unit scale."""
    return nn.Embed(
        vocab_size,
        config.d_model,
        embedding_init=nn.initializers.normal(config.d_model**-0.5),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


def embed_tokens(config, embedding, tokens):
    """`[batch, length]` int -> `[batch, length, d_model]`, times sqrt(d_model)."""
    return embedding(tokens) * jnp.asarray(config.d_model**0.5, config.dtype)


class ClsPooling(nn.Module):
    """The output at position 0, where EncoderClassifier puts its learned [CLS] vector."""

    @nn.compact
    def __call__(self, encoded, padding_mask):
        return encoded[:, 0]


class MeanPooling(nn.Module):
    """The mean over real (non-padding) positions: attention with uniform weights, the baseline."""

    @nn.compact
    def __call__(self, encoded, padding_mask):
        weights = padding_mask.astype(encoded.dtype)[:, :, None]
        count = jnp.maximum(weights.sum(axis=1), 1.0)
        return (encoded * weights).sum(axis=1) / count


class LastPooling(nn.Module):
    """The output at the last real (non-padding) position, where a task puts its question: the
    answer must reach that position through the layers' patterns, as in a decoder."""

    @nn.compact
    def __call__(self, encoded, padding_mask):
        last = jnp.maximum(padding_mask.sum(axis=1) - 1, 0)
        return jnp.take_along_axis(encoded, last[:, None, None], axis=1)[:, 0]


class AttentionPooling(nn.Module):
    """Attention from one learned query to the encoder outputs: a weighted mean whose weights
    the model learns. The query starts at zero, where the weights are uniform (mean pooling)."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, encoded, padding_mask):
        batch, _, d_model = encoded.shape
        query = self.param("query", nn.initializers.zeros, (d_model,), self.param_dtype)
        query = jnp.broadcast_to(query.astype(encoded.dtype), (batch, 1, 1, d_model))
        keys = encoded[:, :, None, :]  # one head: [batch, length, 1, d_model]
        pooled = dot_product_attention(query, keys, keys, mask=padding_mask[:, None, None, :])
        return pooled[:, 0, 0]


# Pooling modules by name, each built from the model's config.
POOLINGS = {
    "cls": lambda config: ClsPooling(),
    "mean": lambda config: MeanPooling(),
    "last": lambda config: LastPooling(),
    "attention": lambda config: AttentionPooling(param_dtype=config.param_dtype),
}


class EncoderClassifier(nn.Module):
    """Sequence classifier: embed tokens, encode, pool, project to class logits.

    Call: `model.apply(variables, inputs, train=False, rngs={"dropout": key})` with inputs int
    `[batch, length]` (0 = padding); returns float32 logits `[batch, num_classes]`. With
    pooling "cls" a learned [CLS] vector is put before the tokens (so a learned positional
    encoding needs max_len >= length + 1). `segment_ids` and `positions` int `[batch, length]`
    restrict attention to segments and place the tokens (as in Encoder); the [CLS] vector joins
    the first token's segment at position 0, before the given positions (each one up by one).
    """

    config: TransformerConfig
    config_fields = ("num_layers", "num_classes", "pooling")  # read beyond the shared ones

    @nn.compact
    def __call__(self, inputs, *, train=False, segment_ids=None, positions=None):
        config = self.config
        if config.context_axis is not None:
            raise ValueError(
                f"context_axis={config.context_axis!r}: EncoderClassifier pools over the whole "
                "sequence, which context parallelism splits over devices; it is supported by "
                "Encoder, Decoder (without cross-attention) and DecoderLM. Set context_axis=None."
            )
        padding_mask = inputs != PAD_ID
        x = embed_tokens(config, token_embedding(config, config.vocab_size, "embed"), inputs)
        if config.pooling == "cls":
            cls = self.param(
                "cls_embedding", nn.initializers.normal(1.0), (config.d_model,), config.param_dtype
            )
            x, padding_mask, segment_ids, positions = _prepend_cls(
                cls, x, padding_mask, segment_ids, positions
            )
        encoded = Encoder(config, name="encoder")(
            x,
            padding_mask,
            deterministic=not train,
            segment_ids=segment_ids,
            positions=positions,
        )
        pooled = POOLINGS[config.pooling](config)(encoded, padding_mask)
        logits = nn.Dense(
            config.num_classes,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            name="classifier",
        )(pooled)
        return logits.astype(jnp.float32)


def _prepend_cls(cls, x, padding_mask, segment_ids, positions):
    """The [CLS] vector `[d_model]` put before x `[batch, length, d_model]`: a real token, in the
    segment of the row's first token, at position 0, the given positions moving up by one."""
    batch = x.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, x.shape[2])), x], 1)
    padding_mask = jnp.concatenate([jnp.ones((batch, 1), bool), padding_mask], axis=1)
    if segment_ids is not None:
        segment_ids = jnp.concatenate([segment_ids[:, :1], segment_ids], axis=1)
    if positions is not None:
        positions = jnp.broadcast_to(positions, padding_mask[:, 1:].shape)
        positions = jnp.concatenate([jnp.zeros((batch, 1), positions.dtype), positions + 1], 1)
    return x, padding_mask, segment_ids, positions


def output_projection(config, vocab_size):
    """The untied output layer, or None when the output reuses the (target) embedding."""
    if config.tie_output_embedding:
        return None
    return nn.Dense(vocab_size, dtype=config.dtype, param_dtype=config.param_dtype)


def output_logits(embedding, projection, x):
    """Next-token logits, float32: through the transposed embedding when tied, else a Dense."""
    logits = embedding.attend(x) if projection is None else projection(x)
    return logits.astype(jnp.float32)


def check_lengths(lengths, batch, prompt_len):
    """Raises ValueError unless `lengths` is `[batch]` integers in [0, prompt_len]."""
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(
            f"lengths must be [batch={batch}] integers; got shape {lengths.shape}, "
            f"dtype {lengths.dtype}."
        )
    if lengths.size and (lengths.min() < 0 or lengths.max() > prompt_len):
        raise ValueError(
            f"lengths must be in [0, prompt_len={prompt_len}]; got {lengths.tolist()}."
        )


def check_prefix_prompt(config, num_layers, lengths=None):
    """Raises a ValueError unless decoding can continue causally: a prefix-LM decoder's prefix
    is bidirectional, so its cache must come from `DecoderLM.prefill` of a prompt covering the
    whole prefix (every row's `lengths` >= n; not checked when traced), never from an empty
    cache filled token by token."""
    prefix = prefix_length(config, num_layers)
    if not prefix:
        return
    if lengths is None:
        raise ValueError(
            f"this decoder's pattern keeps a bidirectional prefix of {prefix} tokens "
            "(prefix_lm), which token-by-token decoding from an empty cache cannot compute; "
            f"start from DecoderLM.prefill with a prompt of at least {prefix} tokens."
        )
    if not isinstance(lengths, jax.core.Tracer) and np.min(np.asarray(lengths)) < prefix:
        raise ValueError(
            f"prefill lengths {np.asarray(lengths).tolist()}: a prefix-LM decoder (prefix "
            f"{prefix}) decodes causally only after its whole prefix; every row's prompt must "
            f"have at least {prefix} tokens."
        )


def check_cache_length(config, max_decode_len):
    """The number of positions a decoding cache holds: `max_decode_len` or config.max_len."""
    max_decode_len = config.max_len if max_decode_len is None else max_decode_len
    if config.positional == "learned" and max_decode_len > config.max_len:
        raise ValueError(
            f"max_decode_len {max_decode_len} exceeds the learned positional "
            f"embedding's max_len {config.max_len}."
        )
    return max_decode_len


class DecoderLM(nn.Module):
    """Decoder-only language model: position i's logits predict token i + 1 from tokens <= i.

    Call: `model.apply(variables, inputs, train=False, rngs={"dropout": key})` with inputs int
    `[batch, length]` (0 = padding, never attended to); returns float32 logits
    `[batch, length, vocab_size]`. The data pipeline shifts: targets[i] = the token after
    inputs[i]. Rows packed with several documents take `segment_ids` int `[batch, length]` (the
    document of each token: none attends to another document) and `positions` int
    `[batch, length]` (each token's position in its document: positional encodings restart),
    after the inputs, as the language-modelling task passes a packed batch's.

    Context parallelism (`context_axis` set): call it inside `jax.shard_map` with inputs (and
    segment_ids, positions) split over that axis; each device returns its shard's logits.

    Decoding with a key/value cache (the `transformer.decoding` protocol):
    `state = model.apply(variables, prompt, method="init_decode_state")`, then
    `logits, state = model.apply(variables, state, token, method="decode_step")` feeds the
    tokens one by one (prompt first, e.g. with `decoding.prefill`); the logits at each step equal
    the full call's at that position (for tokens that are not 0).
    """

    config: TransformerConfig
    # read beyond the shared ones
    config_fields = ("num_layers", "tie_output_embedding", "causal_mask_in_training")

    def setup(self):
        config = self.config
        self.embed = token_embedding(config, config.vocab_size, "embed")
        self.decoder = Decoder(config, config.num_layers)
        self.output_projection = output_projection(config, config.vocab_size)

    def __call__(self, inputs, segment_ids=None, positions=None, *, train=False):
        x = embed_tokens(self.config, self.embed, inputs)
        x = self.decoder(
            x,
            inputs != PAD_ID,
            deterministic=not train,
            segment_ids=segment_ids,
            positions=positions,
        )
        return output_logits(self.embed, self.output_projection, x)

    def init_decode_state(self, inputs, max_decode_len=None):
        """An empty cache for the batch of `inputs` `[batch, ...]` (only its size is read),
        holding `max_decode_len` positions (default config.max_len; a sliding-window layer
        keeps only its window)."""
        max_decode_len = check_cache_length(self.config, max_decode_len)
        check_prefix_prompt(self.config, self.config.num_layers)
        batch = inputs.shape[0]
        return {
            "cache": self.decoder.init_cache(batch, max_decode_len),
            "positions": jnp.zeros((batch,), jnp.int32),
        }

    def prefill(self, prompt, max_decode_len=None, lengths=None):
        """The decoding state after `prompt` int `[batch, prompt_len]`, computed in one forward
        pass with the training path's attention (block-sparse, chunked) rather than token by
        token. A pattern with random blocks runs that pass at the cache's length, the length its
        blocks are drawn for.

        Rows may have different lengths: `lengths` `[batch]` int32 (default prompt_len) counts
        each row's real tokens, the rest being right padding. Row b decodes on from position
        lengths[b]: feed it the token that follows its prompt, usually the prompt's last token
        with `prefill(prompt, lengths=lengths - 1)`.

        A prefix-LM decoder (a `prefix_lm(n)` pattern) computes its prefix bidirectionally
        here, then decodes causally: every row's lengths must be >= n (checked unless traced).
        """
        max_decode_len = check_cache_length(self.config, max_decode_len)
        batch, prompt_len = prompt.shape
        kv_cache.check_prompt_fits(prompt_len, max_decode_len)
        if lengths is None:
            lengths = jnp.full((batch,), prompt_len, jnp.int32)
        if not isinstance(lengths, jax.core.Tracer):
            check_lengths(np.asarray(lengths), batch, prompt_len)
        check_prefix_prompt(self.config, self.config.num_layers, lengths)
        lengths = jnp.asarray(lengths, jnp.int32)
        if any(
            kv_cache.depends_on_length(layer_pattern(self.config, layer, causal=True))
            for layer in range(self.config.num_layers)
        ):
            # Random blocks are drawn for the cache's length, as the decoding steps read them.
            prompt = jnp.pad(prompt, ((0, 0), (0, max_decode_len - prompt_len)))
            prompt_len = max_decode_len
        real = (prompt != PAD_ID) & (jnp.arange(prompt_len)[None, :] < lengths[:, None])
        x = embed_tokens(self.config, self.embed, prompt)
        _, cache = self.decoder.prefill(x, real, lengths, max_decode_len)
        return {"cache": cache, "positions": lengths}

    def decode_step(self, state, token):
        """token int `[batch]`, row b at position state["positions"][b] -> (logits
        `[batch, vocab_size]` float32 for the next token, the new state)."""
        x = embed_tokens(self.config, self.embed, token[:, None])
        x, cache = self.decoder.decode_step(x, state["cache"], state["positions"])
        logits = output_logits(self.embed, self.output_projection, x)[:, 0]
        return logits, {"cache": cache, "positions": state["positions"] + 1}


def shift_right(targets):
    """`[batch, length]`: BOS_ID (the start token) then targets[:, :-1]."""
    return jnp.pad(targets, ((0, 0), (1, 0)), constant_values=BOS_ID)[:, :-1]


class EncoderDecoder(nn.Module):
    """The paper's Transformer: an encoder over the source, a decoder over the shifted target.

    Call: `model.apply(variables, inputs, targets, train=False, rngs={"dropout": key})` with
    inputs int `[batch, source_length]` and targets int `[batch, target_length]` (0 = padding);
    returns float32 logits `[batch, target_length, target_vocab_size]`, where position i
    predicts targets[:, i] from the source and targets[:, :i] (the model shifts the targets right
    itself, putting BOS_ID (1) as the start token).

    Generation with a key/value cache follows the `transformer.decoding` protocol:
    `init_decode_state(inputs)` encodes the source and precomputes each layer's cross-attention
    keys and values; `decode_step(state, token)` feeds one target token (the first is `bos_id`,
    1) and returns the next token's logits, equal to the full call's. So
    `decoding.generate(model, variables, inputs, max_len=..., eos_id=...)` works. Without a
    cache: `encode`, then `decode` on the whole prefix.
    """

    config: TransformerConfig
    config_fields = (
        "num_layers",
        "num_decoder_layers",
        "target_vocab_size",  # read beyond
        "share_embeddings",
        "tie_output_embedding",
    )  # the shared ones
    bos_id = BOS_ID  # the start token that shift_right puts first

    def setup(self):
        config = self.config
        self.source_embedding = token_embedding(config, config.vocab_size, "source_embedding")
        if config.share_embeddings:
            self.target_embedding = self.source_embedding
        else:
            self.target_embedding = token_embedding(
                config, self.target_vocab_size, "target_embedding"
            )
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, config.num_decoder_layers)
        self.output_projection = output_projection(config, self.target_vocab_size)

    @property
    def target_vocab_size(self):
        return self.config.target_vocab_size or self.config.vocab_size

    @property
    def max_decode_len(self):
        """The number of tokens `decoding.generate` produces by default: the cache's length."""
        return self.config.max_len

    def encode(self, inputs, *, train=False):
        """inputs int `[batch, source_length]` -> `[batch, source_length, d_model]`."""
        x = embed_tokens(self.config, self.source_embedding, inputs)
        return self.encoder(x, inputs != PAD_ID, deterministic=not train)

    def decode(self, encoded, inputs, decoder_inputs, *, train=False):
        """Logits `[batch, target_length, target_vocab_size]` (float32) for decoder_inputs int
        `[batch, target_length]` (starting with the BOS_ID start token), attending to `encoded`
        at the real positions of `inputs`."""
        x = embed_tokens(self.config, self.target_embedding, decoder_inputs)
        x = self.decoder(
            x, decoder_inputs != PAD_ID, encoded, inputs != PAD_ID, deterministic=not train
        )
        return output_logits(self.target_embedding, self.output_projection, x)

    def __call__(self, inputs, targets, *, train=False):
        encoded = self.encode(inputs, train=train)
        return self.decode(encoded, inputs, shift_right(targets), train=train)

    def init_decode_state(self, inputs, max_decode_len=None):
        """Encodes `inputs` `[batch, source_length]`; the cache holds `max_decode_len` target
        positions (default config.max_len), start token included."""
        max_decode_len = check_cache_length(self.config, max_decode_len)
        check_prefix_prompt(self.config, self.config.num_decoder_layers)
        encoded = self.encode(inputs)
        return {
            "cache": self.decoder.init_cache(inputs.shape[0], max_decode_len, encoded),
            "positions": jnp.zeros((inputs.shape[0],), jnp.int32),
            "source_mask": inputs != PAD_ID,
        }

    def decode_step(self, state, token):
        """token int `[batch]` at target position state["positions"] -> (logits
        `[batch, target_vocab_size]` float32 for the next token, the new state)."""
        x = embed_tokens(self.config, self.target_embedding, token[:, None])
        positions = state["positions"]
        x, cache = self.decoder.decode_step(x, state["cache"], positions, state["source_mask"])
        logits = output_logits(self.target_embedding, self.output_projection, x)[:, 0]
        return logits, {**state, "cache": cache, "positions": positions + 1}


# The TransformerConfig fields every transformer reads. Each model lists the others it reads in
# `config_fields`; the rest are refused, so no config field is silently ignored.
SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(LayerConfig)) + (
    "vocab_size",
    "max_len",
    "pattern",
    "pattern_options",
)


def transformer_builder(model_class):
    """build(fields, name): `model_class(TransformerConfig(**fields))`, refusing any field the
    model does not read."""

    def build(fields, name):
        allowed = SHARED_FIELDS + model_class.config_fields
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ValueError(
                f"model {name!r} has no field(s) {unknown}; allowed: {sorted(allowed)}."
            )
        return model_class(TransformerConfig(**fields))

    return build


# Model name -> build(fields, name): the model from the config's other fields.
MODELS = {
    "encoder_classifier": transformer_builder(EncoderClassifier),
    "decoder_lm": transformer_builder(DecoderLM),
    "encoder_decoder": transformer_builder(EncoderDecoder),
    "rnn_seq2seq": lambda fields, name: build_rnn_seq2seq(fields),
}

# "Attention Is All You Need", Table 3, base model: 6 + 6 layers, d_model 512, 8 heads,
# d_ff 2048, dropout 0.1, sinusoidal positions, post-LN, one 37,000-token vocabulary shared by
# source, target and output projection.
TRANSFORMER_BASE = dict(
    name="encoder_decoder",
    vocab_size=37_000,
    d_model=512,
    num_heads=8,
    d_ff=2048,
    num_layers=6,
    num_decoder_layers=6,
    dropout_rate=0.1,
    positional="sinusoidal",
    norm_position="post",
    share_embeddings=True,
    tie_output_embedding=True,
)

CONFIGS = {"transformer_base": TRANSFORMER_BASE}


def build_model(model_config):
    """The model named by `model_config["name"]`, with the rest of its fields.

    `model_config` is a dict, a ConfigDict or anything with `.items()`; for example
    `build_model({"name": "decoder_lm", "vocab_size": 256, "d_model": 128, "num_heads": 4,
    "d_ff": 512, "num_layers": 2})`, `build_model(CONFIGS["transformer_base"])`, or the recurrent
    `build_model({"name": "rnn_seq2seq", "vocab_size": 64, "attention": "bahdanau"})` (fields:
    those of RNNSeq2Seq). A missing or unknown name, a field the model does not read, or a bad
    value raises a ValueError naming it and what is allowed.
    """
    if hasattr(model_config, "to_dict"):  # ml_collections.ConfigDict
        model_config = model_config.to_dict()
    fields = dict(model_config.items())
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODELS)}.")
    return MODELS[name](fields, name)
