"""The attention core against float64 NumPy: scores, masks and dense dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import attention


def numpy_attention(q, k, v, mask=None, bias=None, scale=None):
    """float64 reference: softmax over allowed keys, zeros for a query with none."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    allowed = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    exp = np.where(allowed, np.exp(logits - row_max), 0.0)
    total = exp.sum(-1, keepdims=True)
    weights = np.where(total > 0, exp / np.where(total > 0, total, 1.0), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", weights, v), weights


def random_qkv(seed, batch, q_len, kv_len, heads, head_dim, value_dim=None):
    rng = np.random.default_rng(seed)
    value_dim = head_dim if value_dim is None else value_dim
    q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, heads, value_dim)).astype(np.float32)
    return q, k, v


def numerical_grads(f, arrays, eps=1e-6):
    """Central differences in float64 of scalar f w.r.t. each array."""
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array, np.float64)
        for position in np.ndindex(array.shape):
            plus = [a.astype(np.float64).copy() for a in arrays]
            minus = [a.astype(np.float64).copy() for a in arrays]
            plus[index][position] += eps
            minus[index][position] -= eps
            grad[position] = (f(*plus) - f(*minus)) / (2 * eps)
        grads.append(grad)
    return grads


@pytest.mark.parametrize(
    "batch,q_len,kv_len,heads,head_dim,value_dim",
    [(1, 1, 1, 1, 1, 1), (2, 7, 5, 3, 4, 6), (3, 13, 13, 2, 8, 8), (1, 33, 17, 4, 16, 5)],
)
def test_matches_numpy_reference(batch, q_len, kv_len, heads, head_dim, value_dim):
    q, k, v = random_qkv(0, batch, q_len, kv_len, heads, head_dim, value_dim)
    rng = np.random.default_rng(1)
    mask = rng.random((batch, 1, q_len, kv_len)) < 0.7
    bias = rng.standard_normal((1, heads, q_len, kv_len)).astype(np.float32)
    out, weights = attention.dot_product_attention(
        q, k, v, mask=mask, bias=bias, return_weights=True
    )
    expected_out, expected_weights = numpy_attention(q, k, v, mask, bias)
    assert out.shape == (batch, q_len, heads, value_dim)
    np.testing.assert_allclose(out, expected_out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(weights, expected_weights, rtol=2e-5, atol=2e-6)


def test_gradients_match_finite_differences_with_masked_rows():
    q, k, v = random_qkv(2, 1, 4, 3, 2, 3)
    mask = np.array(
        [[True, False, True], [False, False, False], [True, True, True], [False, True, False]]
    )[None, None]
    probe = np.random.default_rng(3).standard_normal((1, 4, 2, 3))

    def loss_np(q, k, v):
        return float(np.sum(numpy_attention(q, k, v, mask)[0] * probe))

    def loss_jax(q, k, v):
        return jnp.sum(attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask)) * probe)

    grads = jax.grad(loss_jax, argnums=(0, 1, 2))(q, k, v)
    expected = numerical_grads(loss_np, [q, k, v])
    for grad, want in zip(grads, expected):
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = random_qkv(4, 2, 6, 6, 2, 4)
    mask = np.ones((2, 1, 6, 6), bool)
    mask[0, 0, 2] = False  # query 2 of batch 0 has no key
    mask[1] = False  # batch 1 has no key at all

    def loss(q, k, v):
        return jnp.sum(attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask)) ** 2)

    out = attention.dot_product_attention(q, k, v, mask=mask)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.asarray(out[0, 2]) == 0) and np.all(np.asarray(out[1]) == 0)
    assert np.all(np.asarray(grads[0][0, 2]) == 0) and np.all(np.asarray(grads[0][1]) == 0)
    for grad in grads:
        assert np.all(np.isfinite(grad))
    # The other rows are untouched by the empty ones.
    np.testing.assert_allclose(out[0, 3], numpy_attention(q, k, v, mask)[0][0, 3], atol=2e-5)


def test_agrees_with_jax_nn_dot_product_attention():
    q, k, v = random_qkv(5, 2, 9, 9, 4, 8)
    mask = np.asarray(attention.causal_mask(9))
    ours = attention.dot_product_attention(q, k, v, mask=mask)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask=mask)))

    ours = jax.grad(loss(attention.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_custom_scale_and_alibi():
    q, k, v = random_qkv(6, 1, 5, 7, 2, 4)
    slopes = np.array([0.5, 0.25], np.float32)
    distance = np.abs(np.arange(5)[:, None] - np.arange(7)[None, :])
    bias = -slopes[None, :, None, None] * distance[None, None]
    out = attention.dot_product_attention(q, k, v, scale=0.3, alibi_slopes=slopes)
    np.testing.assert_allclose(
        out, numpy_attention(q, k, v, bias=bias, scale=0.3)[0], rtol=2e-5, atol=2e-5
    )


def test_runs_under_jit_in_bfloat16():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in random_qkv(7, 1, 8, 8, 2, 16))
    out = jax.jit(attention.dot_product_attention)(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        numpy_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))[0],
        atol=3e-2,
    )


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(query=np.zeros((2, 3, 4))), "must be \\[batch, length, heads, head_dim\\]"),
        (dict(key=np.zeros((1, 5, 2, 7)), value=np.zeros((1, 5, 2, 7))), "head_dim"),
        (dict(mask=np.ones((1, 1, 3, 4), bool)), "does not broadcast"),
        (dict(mask=np.ones((1, 1, 5, 5), np.float32)), "must be boolean"),
    ],
)
def test_bad_shapes_are_named(bad, message):
    args = dict(
        query=np.zeros((1, 5, 2, 4)), key=np.zeros((1, 5, 2, 4)), value=np.zeros((1, 5, 2, 4))
    )
    args.update(bad)
    mask = args.pop("mask", None)
    with pytest.raises(ValueError, match=message):
        attention.dot_product_attention(args["query"], args["key"], args["value"], mask=mask)


def test_causal_and_padding_masks():
    causal = np.asarray(attention.causal_mask(3, 5, offset=2))[0, 0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((3, 5), bool), k=2))
    lengths = attention.padding_mask_from_lengths(np.array([2, 0, 4]), 4)
    tokens = attention.padding_mask_from_tokens(
        np.array([[5, 3, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
    )
    np.testing.assert_array_equal(lengths, tokens)
    combined = attention.combine_masks(
        attention.causal_mask(4), attention.attention_padding_mask(lengths)
    )
    assert combined.shape == (3, 1, 4, 4)
    expected = (
        np.tril(np.ones((4, 4), bool))[None]
        & np.asarray(lengths)[:, :, None]
        & np.asarray(lengths)[:, None, :]
    )
    np.testing.assert_array_equal(combined[:, 0], expected)
    assert attention.combine_masks(None, None) is None


def test_score_functions():
    rng = np.random.default_rng(8)
    query, key = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    np.testing.assert_allclose(
        attention.dot_score(query, key), np.einsum("bqd,bkd->bqk", query, key), rtol=1e-5
    )
    np.testing.assert_allclose(
        attention.scaled_dot_score(query, key),
        np.einsum("bqd,bkd->bqk", query, key) / 2.0,
        rtol=1e-5,
    )
    weight = rng.standard_normal((4, 4))
    np.testing.assert_allclose(
        attention.general_score(query, key, weight),
        np.einsum("bqd,de,bke->bqk", query, weight, key),
        rtol=1e-4,
    )
    wq, wk, v = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), rng.standard_normal(6)
    # The definition: v^T tanh(W [s; h]) with W = [W_q; W_k] acting on the concatenation.
    expected = np.empty((2, 3, 5))
    for b, i, j in np.ndindex(2, 3, 5):
        concat = np.concatenate([query[b, i], key[b, j]])
        expected[b, i, j] = v @ np.tanh(concat @ np.concatenate([wq, wk]))
    np.testing.assert_allclose(
        attention.additive_score(query, key, wq, wk, v), expected, rtol=1e-4, atol=1e-5
    )
    mean = jax.nn.softmax(attention.mean_pool_score(query, key), axis=-1)
    np.testing.assert_allclose(mean, np.full((2, 3, 5), 0.2), rtol=1e-6)
