"""Context parallelism in the models: a DecoderLM and an Encoder called inside `jax.shard_map`,
each device holding one shard of every sequence (`context_axis`), give the logits and gradients
of the same model run on whole sequences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from transformer.attention import ring
from transformer.modules.dropout import Dropout
from transformer.modules.models import DecoderLM, Encoder, EncoderClassifier, TransformerConfig

BATCH, LENGTH, VOCAB = 2, 16, 32
# float32: the ring sums the same terms as the whole-sequence attention, in another order.
TOLERANCE = dict(rtol=2e-5, atol=2e-5)


def _config(**fields):
    base = dict(
        vocab_size=VOCAB,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=1,
        max_len=LENGTH,
        dropout_rate=0.0,
        norm_position="pre",
        implementation="dense",
    )
    return TransformerConfig(**{**base, **fields})


def _tokens(seed=0):
    tokens = np.random.default_rng(seed).integers(1, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    tokens[1, -3:] = 0  # padding at the end of the second row
    tokens[0, 5] = 0  # and a padded key inside a shard of the first
    return tokens


def _sharded(apply, n, order):
    """apply(params, *arrays [batch, length]) -> [batch, length, ...], run on n devices, each
    with one shard of the length (in `order`), and returned in the natural order."""
    mesh = Mesh(np.array(jax.devices()[:n]), ("context",))
    spec = P(None, "context")

    def whole(params, *arrays):
        if order == "zigzag":
            arrays = [ring.to_zigzag(a, n) for a in arrays]
        in_specs = (P(),) + (spec,) * len(arrays)
        out = jax.shard_map(apply, mesh=mesh, in_specs=in_specs, out_specs=spec)(params, *arrays)
        return ring.from_zigzag(out, n) if order == "zigzag" else out

    return whole


def _logits_and_grads(apply, params, *arrays):
    weights = jax.random.normal(jax.random.key(1), jax.eval_shape(apply, params, *arrays).shape)

    def loss(params):
        out = apply(params, *arrays)
        return (out * weights).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads


def _check_sharded_equals_whole(model, sharded_model, apply, n, order, extras=()):
    tokens = jnp.asarray(_tokens())
    params = jax.jit(model.init)(jax.random.key(0), tokens)

    def whole_apply(params, *arrays):
        return apply(model, params, *arrays)

    def shard_apply(params, *arrays):
        return apply(sharded_model, params, *arrays)

    arrays = (tokens,) + tuple(jnp.asarray(a) for a in extras)
    expected, expected_grads = _logits_and_grads(whole_apply, params, *arrays)
    out, grads = _logits_and_grads(_sharded(shard_apply, n, order), params, *arrays)
    np.testing.assert_allclose(out, expected, **TOLERANCE)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), grads, expected_grads)
    assert float(jnp.abs(expected).max()) > 0


def _apply(model, params, *arrays):
    return model.apply(params, *arrays)


@pytest.mark.parametrize(
    "n, order, positional",
    [
        (2, "contiguous", "rotary"),
        (4, "zigzag", "sinusoidal"),
        (4, "contiguous", "alibi"),
        (2, "zigzag", "learned"),
    ],
)
def test_decoder_lm_sharded_over_context_equals_the_whole_model(n, order, positional):
    config = _config(pattern="causal", positional=positional)
    sharded = dataclasses.replace(config, context_axis="context", context_order=order)
    _check_sharded_equals_whole(DecoderLM(config), DecoderLM(sharded), _apply, n, order)


@pytest.mark.parametrize(
    "n, order, positional, pattern, options",
    [
        (4, "contiguous", "rotary", "full", {}),
        (2, "zigzag", "sinusoidal", "sliding_window", {"left": 3, "right": 2}),
    ],
)
def test_encoder_sharded_over_context_equals_the_whole_encoder(
    n, order, positional, pattern, options
):
    config = _config(pattern=pattern, pattern_options=options, positional=positional)
    sharded = dataclasses.replace(config, context_axis="context", context_order=order)
    _check_sharded_equals_whole(
        _EncoderOnTokens(Encoder(config)), _EncoderOnTokens(Encoder(sharded)), _apply, n, order
    )


class _EncoderOnTokens:
    """An Encoder with the init/apply of a model on tokens: one-hot embeddings, padding at 0."""

    def __init__(self, encoder):
        self.encoder = encoder

    def _embed(self, tokens):
        return jax.nn.one_hot(tokens, self.encoder.config.d_model) * 3.0, tokens != 0

    def init(self, key, tokens):
        return self.encoder.init(key, *self._embed(tokens))

    def apply(self, params, tokens):
        return self.encoder.apply(params, *self._embed(tokens))


def test_packed_rows_with_grouped_heads_soft_cap_and_sinks_sharded_over_context():
    """Segment ids and per-document positions split with the tokens; the ring computes the
    soft cap, the sinks and grouped-query heads as the whole model's attention does."""
    config = _config(
        pattern="causal",
        positional="rotary",
        num_kv_heads=1,
        logit_soft_cap=5.0,
        attention_sinks=True,
    )
    sharded = dataclasses.replace(config, context_axis="context", context_order="zigzag")
    segment_ids = np.repeat([[1] * 7 + [2] * 9], BATCH, axis=0).astype(np.int32)
    positions = np.where(segment_ids == 1, np.arange(LENGTH), np.arange(LENGTH) - 7)
    extras = (segment_ids, positions.astype(np.int32))
    _check_sharded_equals_whole(DecoderLM(config), DecoderLM(sharded), _apply, 4, "zigzag", extras)


@pytest.mark.parametrize("context_axis", [None, "context"])
def test_each_context_shard_draws_its_own_dropout_mask(context_axis):
    """Every device gets the same "dropout" key: without the axis folded in, each shard would
    drop the same positions."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("context",))
    dropout = Dropout(0.5, context_axis=context_axis)

    def per_device(x):
        return dropout.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})

    spec = P(None, "context")
    out = jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec)(jnp.ones((1, 64, 4)))
    first, second = np.asarray(out[:, :32] == 0), np.asarray(out[:, 32:] == 0)
    assert 0.3 < first.mean() < 0.7
    assert (first == second).all() == (context_axis is None)


def test_context_parallelism_refuses_what_it_does_not_support():
    config = _config(pattern="causal", context_axis="context")
    tokens = jnp.asarray(_tokens())
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        DecoderLM(config).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="decoding with a key/value cache is not supported"):
        DecoderLM(config).init(jax.random.key(0), tokens, method="init_decode_state")
    with pytest.raises(ValueError, match="EncoderClassifier pools over the whole sequence"):
        EncoderClassifier(config).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="context_order"):
        _config(context_axis="context", context_order="striped")
    with pytest.raises(ValueError, match="context_axis must be None or the name"):
        _config(context_axis=3)
