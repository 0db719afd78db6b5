"""Flax modules against float64 NumPy references; order (positional encodings); jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from transformer import patterns
from transformer.modules.feedforward import FeedForward
from transformer.modules.layers import NORM_POSITIONS, DecoderLayer, EncoderLayer, LayerConfig
from transformer.modules.models import Encoder, TransformerConfig
from transformer.modules.multihead_attention import MultiHeadAttention
from transformer.modules.positional import POSITIONAL_ENCODINGS, alibi_slopes


def as_f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def rotate_half_reference(x, base=10_000.0):
    """RoPE on `[batch, length, heads, head_dim]`, pairing feature i with i + head_dim/2."""
    length, half = x.shape[1], x.shape[-1] // 2
    angle = np.arange(length)[:, None] * base ** (-np.arange(half) / half)  # [length, half]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def attention_reference(params, x_q, x_kv, key_valid, positional="none"):
    """Multi-head attention in float64 NumPy, from the module's parameters."""
    p = as_f64(params)
    x_q, x_kv = np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64)
    q = np.einsum("bld,dhk->blhk", x_q, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bld,dhk->blhk", x_kv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bld,dhk->blhk", x_kv, p["value"]["kernel"]) + p["value"]["bias"]
    if positional == "rotary":
        q, k = rotate_half_reference(q), rotate_half_reference(k)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if positional == "alibi":
        distance = np.abs(np.arange(q.shape[1])[:, None] - np.arange(k.shape[1])[None, :])
        logits = logits - np.asarray(alibi_slopes(q.shape[2]), np.float64)[:, None, None] * distance
    logits = np.where(np.asarray(key_valid)[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return np.einsum("bqhd,hdo->bqo", heads, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("positional", ["none", "rotary", "alibi"])
def test_self_attention_matches_float64_reference(positional):
    module = MultiHeadAttention(num_heads=4, features=16, positional=positional)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    key_valid = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
    variables = jax.jit(module.init)(jax.random.key(1), x)
    out = jax.jit(lambda v, x, m: module.apply(v, x, key_padding_mask=m))(variables, x, key_valid)
    assert out.shape == (2, 7, 16)
    expected = attention_reference(variables["params"], x, x, key_valid, positional)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_cross_attention_matches_reference_and_ignores_padded_keys():
    module = MultiHeadAttention(num_heads=2, features=6, head_dim=5)
    x_q = jax.random.normal(jax.random.key(0), (2, 3, 6))
    x_kv = jax.random.normal(jax.random.key(1), (2, 8, 10))
    key_valid = jnp.arange(8)[None, :] < jnp.array([[8], [5]])
    variables = jax.jit(module.init)(jax.random.key(2), x_q, x_kv)
    apply = jax.jit(lambda v, q, kv: module.apply(v, q, kv, key_padding_mask=key_valid))
    out = apply(variables, x_q, x_kv)
    assert out.shape == (2, 3, 6)
    np.testing.assert_allclose(
        out, attention_reference(variables["params"], x_q, x_kv, key_valid), rtol=1e-4, atol=1e-5
    )
    changed = x_kv.at[1, 5:].set(100.0)  # only padded keys of row 1 change
    np.testing.assert_allclose(apply(variables, x_q, changed), out, rtol=1e-6, atol=1e-6)


def test_attention_weights_are_sown_and_dropped_out_only_when_not_deterministic():
    module = MultiHeadAttention(num_heads=2, features=8, dropout_rate=0.5, sow_weights=True)
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))
    key_valid = jnp.array([[True, True, True, False, False]])
    variables = module.init(jax.random.key(1), x)
    out, state = module.apply(variables, x, key_padding_mask=key_valid, mutable=["intermediates"])
    (weights,) = state["intermediates"]["attention_weights"]
    assert weights.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert np.all(weights[..., 3:] == 0.0)
    dropped, _ = module.apply(
        variables,
        x,
        key_padding_mask=key_valid,
        deterministic=False,
        rngs={"dropout": jax.random.key(2)},
        mutable=["intermediates"],
    )
    assert not np.allclose(dropped, out, atol=1e-3)


def test_attention_heads_must_divide_features():
    module = MultiHeadAttention(num_heads=3, features=8)
    with pytest.raises(ValueError, match="features 8 is not divisible by num_heads 3"):
        module.init(jax.random.key(0), jnp.zeros((1, 2, 8)))


def test_feed_forward_matches_reference_under_jit():
    module = FeedForward(d_ff=12, activation="relu")
    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    variables = jax.jit(module.init)(jax.random.key(1), x)
    p = as_f64(variables["params"])
    hidden = np.maximum(np.asarray(x, np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    expected = hidden @ p["output"]["kernel"] + p["output"]["bias"]
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown activation 'swish'; allowed: relu"):
        FeedForward(d_ff=4, activation="swish").init(jax.random.key(0), x)


class ResidualDense(nn.Module):
    """A Dense sublayer in a residual connection, to test the two layer-norm placements."""

    norm_position: str

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(x.shape[-1], name="dense")
        return NORM_POSITIONS[self.norm_position](x, dense, nn.LayerNorm(epsilon=1e-6), lambda y: y)


def layer_norm_reference(x, eps=1e-6):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_residual_with_post_and_pre_layer_norm(norm_position):
    module = ResidualDense(norm_position)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 4, 6))
    variables = jax.jit(module.init)(jax.random.key(1), x)
    p = as_f64(variables["params"])

    def dense(h):
        return h @ p["dense"]["kernel"] + p["dense"]["bias"]

    x64 = np.asarray(x, np.float64)
    # LayerNorm's scale and offset start at 1 and 0, so the reference can leave them out.
    if norm_position == "post":
        expected = layer_norm_reference(x64 + dense(x64))
    else:
        expected = x64 + dense(layer_norm_reference(x64))
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), expected, rtol=1e-4, atol=1e-5)


def test_layer_config_rejects_unknown_norm_position():
    with pytest.raises(ValueError, match="unknown norm_position 'sandwich'; allowed: post, pre"):
        LayerConfig(norm_position="sandwich")


def test_decoder_layer_without_encoder_is_an_encoder_layer_with_a_causal_pattern_under_jit():
    config = LayerConfig(d_model=8, num_heads=2, d_ff=16, dropout_rate=0.0, positional="rotary")
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    valid = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
    decoder_layer = DecoderLayer(config, pattern=patterns.causal())
    variables = jax.jit(decoder_layer.init)(jax.random.key(1), x, valid)
    assert "cross_attention" not in variables["params"]  # a decoder-only layer has none
    encoder_layer = EncoderLayer(config, pattern=patterns.causal())
    np.testing.assert_allclose(
        jax.jit(decoder_layer.apply)(variables, x, valid),
        jax.jit(encoder_layer.apply)(variables, x, valid),
        rtol=1e-6,
        atol=1e-6,
    )
    encoded = jax.random.normal(jax.random.key(2), (2, 3, 8))
    with_cross = jax.jit(decoder_layer.init)(jax.random.key(1), x, valid, encoded)
    out = jax.jit(decoder_layer.apply)(with_cross, x, valid, encoded)
    assert out.shape == x.shape and np.all(np.isfinite(out))


def test_encoder_is_permutation_equivariant_only_without_positional_encoding():
    x = jax.random.normal(jax.random.key(0), (1, 6, 16))
    permutation = np.array([3, 0, 5, 1, 4, 2])

    def encoder(positional):
        return Encoder(
            TransformerConfig(
                d_model=16, num_heads=2, d_ff=32, num_layers=1, positional=positional, max_len=6
            )
        )

    # Only "learned" has parameters of its own; the others share the layers' parameters.
    variables = {
        positional: jax.jit(encoder(positional).init)(jax.random.key(1), x)
        for positional in ("none", "learned")
    }
    for positional in POSITIONAL_ENCODINGS:
        apply = jax.jit(encoder(positional).apply)
        params = variables["learned" if positional == "learned" else "none"]
        permuted_outputs = apply(params, x)[:, permutation]
        outputs_of_permuted = apply(params, x[:, permutation])
        equivariant = np.allclose(outputs_of_permuted, permuted_outputs, rtol=1e-5, atol=1e-5)
        assert equivariant == (positional == "none"), positional
