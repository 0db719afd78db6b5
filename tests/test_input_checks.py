"""Bad inputs are refused at the door: a ValueError or TypeError naming the argument and what is
allowed, before any computation, instead of a silently wrong result or an error from inside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.attention import dot_product_attention
from transformer.data import registry
from transformer.modules import build_model
from transformer.modules.feedforward import FeedForward
from transformer.modules.layers import LayerConfig
from transformer.modules.multihead_attention import MultiHeadAttention
from transformer.modules.rnn import RNNSeq2Seq

# The implementations that run on CPU; each is reached through dot_product_attention.
IMPLEMENTATIONS = ("dense", "chunked", "block_sparse", "xla")
SHAPE = (1, 8, 2, 4)  # [batch, length, heads, head_dim]
SMALL_LM = dict(name="decoder_lm", vocab_size=16, d_model=8, num_heads=2, d_ff=16, num_layers=1)


def qkv(dtype=jnp.float32, shape=SHAPE):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    return x.astype(dtype), (x * 0.5).astype(dtype), (x - 1.0).astype(dtype)


# --- Attention inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_integer_inputs_are_refused_not_truncated(implementation):
    q = jnp.ones(SHAPE, jnp.int32)
    with pytest.raises(TypeError, match="query must have a floating dtype.*got int32"):
        dot_product_attention(q, q, q, implementation=implementation)
    f = jnp.ones(SHAPE)
    with pytest.raises(TypeError, match="value must have a floating dtype.*got int32"):
        dot_product_attention(f, f, q, implementation=implementation)


@pytest.mark.parametrize("implementation", ("dense", "chunked"))
@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16))
def test_other_floating_precisions_still_work(implementation, dtype):
    q, k, v = qkv(dtype)
    out = dot_product_attention(q, k, v, implementation=implementation)
    reference = dot_product_attention(*qkv(), implementation="dense")
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=0.05)


@pytest.mark.parametrize("implementation", ("dense", "chunked"))
def test_float64_inputs_still_work(implementation):
    with jax.enable_x64(True):
        q, k, v = (np.asarray(x, np.float64) for x in qkv())
        out = dot_product_attention(q, k, v, implementation=implementation)
        assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, dot_product_attention(*qkv()), atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_empty_lengths_are_an_error_in_every_implementation(implementation):
    """Length 0 is refused everywhere (the chunked one divided by zero; others, in the patterns)."""
    empty = jnp.ones((1, 0, 2, 4))
    full = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match="query q_len must be at least 1"):
        dot_product_attention(empty, full, full, implementation=implementation)
    with pytest.raises(ValueError, match="key kv_len must be at least 1"):
        dot_product_attention(full, empty, empty, implementation=implementation)


def test_python_lists_are_refused_with_a_type_error():
    as_list = np.ones(SHAPE).tolist()
    with pytest.raises(TypeError, match="query must be a jax or NumPy array; got list"):
        dot_product_attention(as_list, as_list, as_list)
    q, k, v = qkv()
    with pytest.raises(TypeError, match="value must be a jax or NumPy array; got tuple"):
        dot_product_attention(q, k, tuple(np.asarray(v).tolist()))
    with pytest.raises(TypeError, match="mask must be a jax or NumPy array or None; got list"):
        dot_product_attention(q, k, v, mask=[[[[True] * 8]]])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_alibi_slopes_of_the_wrong_length_name_the_argument(implementation):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[heads\] = \(2,\)"):
        dot_product_attention(
            q, k, v, alibi_slopes=jnp.ones(3), pattern="causal", implementation=implementation
        )


@pytest.mark.parametrize("rate", (1.5, -0.1, 1.0, "0.1"))
def test_attention_dropout_rate_outside_0_1_is_refused(rate):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\)"):
        dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(0))


# --- Module and model configs -------------------------------------------------------------


def test_layer_config_dropout_rate_is_checked():
    with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\); got 1.5"):
        LayerConfig(dropout_rate=1.5)
    with pytest.raises(ValueError, match=r"attention_dropout_rate must be a number in \[0, 1\)"):
        build_model({**SMALL_LM, "attention_dropout_rate": 1.5})


def test_module_dropout_rates_are_checked():
    x = jnp.ones((1, 4, 8))
    with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\); got 1.5"):
        MultiHeadAttention(num_heads=2, features=8, dropout_rate=1.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\); got 1.5"):
        FeedForward(d_ff=16, dropout_rate=1.5).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\); got 1.5"):
        RNNSeq2Seq(vocab_size=16, dropout_rate=1.5)


@pytest.mark.parametrize("epsilon", (-1, 0.0, "1e-6"))
def test_layer_norm_epsilon_must_be_positive(epsilon):
    with pytest.raises(ValueError, match="layer_norm_epsilon must be a number > 0"):
        LayerConfig(layer_norm_epsilon=epsilon)
    with pytest.raises(ValueError, match="layer_norm_epsilon must be a number > 0"):
        build_model({**SMALL_LM, "layer_norm_epsilon": epsilon})


@pytest.mark.parametrize("head_dim", (-4, 0, "8", 4.0, True))
def test_head_dim_must_be_a_positive_int(head_dim):
    message = "head_dim must be a positive integer or None"
    with pytest.raises(ValueError, match=message):
        LayerConfig(head_dim=head_dim)
    with pytest.raises(ValueError, match=message):
        build_model({**SMALL_LM, "head_dim": head_dim})
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(num_heads=2, features=8, head_dim=head_dim).init(
            jax.random.key(0), jnp.ones((1, 4, 8))
        )


def test_good_head_dim_and_epsilon_still_build():
    config = LayerConfig(d_model=8, num_heads=2, head_dim=np.int64(6), layer_norm_epsilon=1e-5)
    assert config.head_dim == 6


def test_rnn_widths_must_be_positive_ints():
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer; got -4"):
        RNNSeq2Seq(vocab_size=16, hidden_dim=-4)
    with pytest.raises(ValueError, match="embed_dim must be a positive integer; got '8'"):
        RNNSeq2Seq(vocab_size=16, embed_dim="8")


# --- Data overrides -------------------------------------------------------------------------


def builder_config(**overrides):
    return registry.builder_config(
        dict(name="associative_recall", config="pairs64", builder_overrides=overrides)
    )


def test_a_bad_override_is_blamed_on_the_field_that_was_set():
    with pytest.raises(ValueError, match="num_pairs must be an integer >= 1; got -1") as error:
        builder_config(num_pairs=-1)
    assert "builder_overrides set num_pairs=-1" in str(error.value)


def test_an_override_that_moves_another_fields_range_says_what_it_needs():
    # pairs64 keeps distance=64, which 2 pairs cannot reach.
    with pytest.raises(ValueError, match="num_pairs must be >= 32 for this distance") as error:
        builder_config(num_pairs=2)
    assert "builder_overrides set num_pairs=2" in str(error.value)
    with pytest.raises(ValueError, match="num_pairs must be <= 128 for these keys"):
        builder_config(num_pairs=200, distance=2)
    assert builder_config(num_pairs=2, distance=4).num_pairs == 2
