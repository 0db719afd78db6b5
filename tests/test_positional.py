"""Positional encodings against their papers' definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.modules.positional import (
    LearnedPositionalEmbedding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    apply_rotary,
    sinusoidal_encoding,
)


def test_sinusoidal_matches_the_papers_formula():
    length, d_model = 50, 12
    expected = np.zeros((length, d_model))
    for pos in range(length):
        for i in range(d_model // 2):
            expected[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / d_model))
            expected[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / d_model))
    np.testing.assert_allclose(sinusoidal_encoding(length, d_model), expected, atol=2e-6)


def test_sinusoidal_module_adds_the_table_under_jit():
    x = jax.random.normal(jax.random.key(0), (2, 7, 8))
    module = SinusoidalPositionalEncoding()
    out = jax.jit(module.apply)({}, x)
    np.testing.assert_allclose(out, x + sinusoidal_encoding(7, 8)[None], atol=1e-6)


def test_sinusoidal_needs_even_width():
    with pytest.raises(ValueError, match="even d_model; got 7"):
        sinusoidal_encoding(4, 7)


def test_learned_embedding_adds_a_trained_vector_per_position_under_jit():
    module = LearnedPositionalEmbedding(max_len=6)
    x = jnp.zeros((2, 4, 8))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    table = variables["params"]["embedding"]
    assert table.shape == (6, 8)
    out = jax.jit(module.apply)(variables, x)
    np.testing.assert_array_equal(out, jnp.broadcast_to(table[:4], (2, 4, 8)))
    module.apply(variables, jnp.zeros((1, 6, 8)))  # exactly max_len is fine


def test_learned_positions_start_at_the_scale_of_the_token_embeddings():
    """The vectors added to the tokens must not be drowned by them at initialisation."""
    from transformer.modules import build_model

    config = dict(
        name="encoder_classifier",
        vocab_size=100,
        d_model=64,
        num_heads=4,
        d_ff=128,
        num_layers=1,
        num_classes=2,
        pooling="mean",
        positional="learned",
        max_len=64,
    )
    model = build_model(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 64), jnp.int32))["params"]
    tokens = params["embed"]["embedding"] * 64**0.5  # as embed_tokens scales them
    positions = params["encoder"]["LearnedPositionalEmbedding_0"]["embedding"]
    ratio = float(jnp.std(positions) / jnp.std(tokens))
    assert 0.5 < ratio < 2.0, ratio


def test_learned_embedding_refuses_inputs_past_its_max_length():
    module = LearnedPositionalEmbedding(max_len=6)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 6, 8)))
    with pytest.raises(
        ValueError, match="input length 7 exceeds the learned positional embedding's max_len 6"
    ):
        module.apply(variables, jnp.zeros((1, 7, 8)))


def test_rotary_preserves_norms_and_is_the_identity_at_position_zero():
    x = jax.random.normal(jax.random.key(0), (2, 9, 3, 8))
    rotated = jax.jit(apply_rotary)(x)
    np.testing.assert_allclose(
        jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
    )
    np.testing.assert_allclose(rotated[:, 0], x[:, 0], atol=1e-6)
    assert not np.allclose(rotated[:, 1:], x[:, 1:], atol=1e-3)


def test_rotary_dot_products_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n):
        rotated_q = apply_rotary(q, jnp.array([m]))
        rotated_k = apply_rotary(k, jnp.array([n]))
        return float(jnp.sum(rotated_q * rotated_k))

    for m, n in [(3, 1), (10, 2), (5, 9), (0, 7)]:
        for shift in (1, 17, 300):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-4, abs=1e-4)
    # ... and does depend on it.
    assert abs(score(5, 1) - score(5, 3)) > 1e-2


def test_rotary_under_jit_with_batch_positions():
    x = jax.random.normal(jax.random.key(0), (2, 5, 2, 8))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    out = jax.jit(apply_rotary)(x, positions)
    np.testing.assert_allclose(out[0], apply_rotary(x[:1])[0], atol=1e-6)
    np.testing.assert_allclose(out[1], apply_rotary(x[1:], jnp.arange(7, 12))[0], atol=1e-6)


def test_rotary_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head_dim; got 5"):
        apply_rotary(jnp.zeros((1, 2, 1, 5)))


def test_alibi_slopes_are_the_papers_geometric_sequence():
    # Press et al.: for 8 heads, 1/2, 1/4, ..., 1/256; in general start = ratio = 2^(-8/n).
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-h for h in range(1, 9)])
    for heads in (1, 2, 4, 16, 32):
        ratio = 2.0 ** (-8.0 / heads)
        np.testing.assert_allclose(alibi_slopes(heads), ratio ** np.arange(1, heads + 1), rtol=1e-6)


def test_alibi_slopes_for_head_counts_that_are_not_powers_of_two():
    # The paper's code: the 8-head slopes, then every other 16-head slope (2^-0.5, 2^-1.5, ...).
    expected = [2.0**-h for h in range(1, 9)] + [2.0 ** -(h + 0.5) for h in range(4)]
    np.testing.assert_allclose(alibi_slopes(12), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="num_heads must be positive"):
        alibi_slopes(0)
