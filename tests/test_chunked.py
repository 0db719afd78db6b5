"""Chunked attention against a float64 NumPy reference: forward, gradients, masks and memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from transformer.attention import chunked
from transformer.attention.chunked import chunked_attention


def reference_attention(q, k, v, d_out, *, scale, causal, key_valid, slopes):
    """Float64 softmax attention and its gradients for the loss sum(out * d_out).

    Returns (out, dq, dk, dv, d_slopes) with the layouts of the inputs.
    """
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    q_len, kv_len = q.shape[1], k.shape[1]
    query_pos = np.arange(q_len)[:, None] + (kv_len - q_len)
    key_pos = np.arange(kv_len)[None, :]
    distance = np.abs(query_pos - key_pos).astype(np.float64)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if slopes is not None:
        logits = logits - np.asarray(slopes, np.float64)[None, :, None, None] * distance
    allowed = np.ones(logits.shape, bool)
    if causal:
        allowed &= key_pos <= query_pos
    if key_valid is not None:
        allowed &= np.asarray(key_valid)[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    exp = np.exp(logits - row_max)
    total = exp.sum(-1, keepdims=True)
    probs = np.where(total > 0, exp / np.where(total > 0, total, 1.0), 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    d_probs = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    d_logits = probs * (d_probs - (probs * d_probs).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", d_logits, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", d_logits, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", probs, d_out)
    d_slopes = -(d_logits * distance).sum((0, 2, 3))
    return out, dq, dk, dv, d_slopes


def random_inputs(seed, batch, q_len, kv_len, heads, head_dim, value_dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, heads, head_dim))
    k = rng.normal(size=(batch, kv_len, heads, head_dim))
    v = rng.normal(size=(batch, kv_len, heads, value_dim))
    d_out = rng.normal(size=(batch, q_len, heads, value_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, d_out))


def chunked_and_grads(q, k, v, d_out, slopes, **kwargs):
    """Output and (dq, dk, dv, d_slopes) of chunked attention for the loss sum(out * d_out)."""

    @jax.jit
    def run(q, k, v, slopes):
        out, vjp = jax.vjp(
            lambda *a: chunked_attention(*a[:3], alibi_slopes=a[3], **kwargs), q, k, v, slopes
        )
        return out, vjp(d_out)

    return run(q, k, v, slopes)


# (batch, q_len, kv_len, heads, head_dim, value_dim, chunk_size, causal, padding, alibi)
CASES = [
    (1, 37, 37, 2, 16, 16, 8, False, False, False),  # odd length, chunk does not divide it
    (2, 37, 37, 3, 16, 8, (16, 8), True, False, False),  # causal, value_dim != head_dim
    (2, 53, 29, 2, 8, 8, (8, 16), True, True, True),  # q_len > kv_len: early rows see no key
    (1, 19, 70, 2, 16, 16, 12, True, True, False),  # q_len < kv_len, queries at the end
    (2, 45, 45, 2, 16, 16, 64, False, True, True),  # one chunk longer than the sequence
    (1, 33, 41, 1, 32, 16, None, False, False, True),  # default chunk sizes
    (1, 24, 24, 2, 8, 8, 1, True, False, True),  # chunk size 1
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_float64_reference(case):
    batch, q_len, kv_len, heads, head_dim, value_dim, chunk_size, causal, padding, alibi = case
    seed = sum(x if isinstance(x, int) else 7 for x in case[:6])
    q, k, v, d_out = random_inputs(seed, batch, q_len, kv_len, heads, head_dim, value_dim)
    rng = np.random.default_rng(seed + 1)
    key_valid = jnp.asarray(rng.random((batch, kv_len)) > 0.3) if padding else None
    slopes = jnp.asarray(rng.uniform(0.05, 1.0, heads), jnp.float32) if alibi else None
    scale = 0.3
    out, (dq, dk, dv, d_slopes) = chunked_and_grads(
        q,
        k,
        v,
        d_out,
        slopes,
        scale=scale,
        causal=causal,
        key_valid=key_valid,
        chunk_size=chunk_size,
    )
    expected = reference_attention(
        q, k, v, d_out, scale=scale, causal=causal, key_valid=key_valid, slopes=slopes
    )
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=name)
    if alibi:
        np.testing.assert_allclose(d_slopes, expected[4], atol=1e-3, rtol=1e-4)
    else:
        assert d_slopes is None


@pytest.mark.parametrize("per_tile", [1, 2, 6])
def test_batch_elements_in_groups_match_reference(monkeypatch, per_tile):
    # Long sequences take a few batch elements per tile (a lax.map over groups of them); make
    # these short ones do the same: 1, 2 or all 6 elements per tile.
    monkeypatch.setattr(chunked, "_TILE_ELEMENTS", per_tile * 2 * 8 * 8)
    assert chunked._batch_group(6, 2 * 8 * 8) == per_tile
    q, k, v, d_out = random_inputs(11, 6, 21, 21, 2, 8, 8)
    rng = np.random.default_rng(12)
    key_valid = jnp.asarray(rng.random((6, 21)) > 0.3)
    slopes = jnp.asarray(rng.uniform(0.05, 1.0, 2), jnp.float32)
    out, grads = chunked_and_grads(
        q, k, v, d_out, slopes, causal=True, key_valid=key_valid, chunk_size=8
    )
    expected = reference_attention(
        q, k, v, d_out, scale=8**-0.5, causal=True, key_valid=key_valid, slopes=slopes
    )
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads[:3]), expected):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(grads[3], expected[4], atol=1e-3, rtol=1e-4)


def test_rows_with_no_valid_key_get_zeros_not_nan():
    q, k, v, d_out = random_inputs(0, 2, 21, 13, 2, 8, 8)
    key_valid = jnp.asarray(np.arange(13)[None, :] < np.array([[0], [5]]))  # row 0: no key
    # Causal with q_len > kv_len: the first 8 queries precede every key.
    out, (dq, dk, dv, _) = chunked_and_grads(
        q, k, v, d_out, None, causal=True, key_valid=key_valid, chunk_size=4
    )
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(x))
    assert np.all(out[0] == 0) and np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
    assert np.all(out[1, :8] == 0) and np.all(dq[1, :8] == 0)
    expected = reference_attention(
        q, k, v, d_out, scale=8**-0.5, causal=True, key_valid=key_valid, slopes=None
    )
    for got, want in zip((out, dq, dk, dv), expected):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("batch", [1, 2])  # batched bfloat16 dots are not in XLA:CPU's runtime
def test_bfloat16_inputs_keep_float32_statistics(batch):
    q, k, v, d_out = random_inputs(3, batch, 50, 50, 2, 16, 16, dtype=jnp.bfloat16)
    out, (dq, dk, dv, _) = chunked_and_grads(q, k, v, d_out, None, causal=True, chunk_size=16)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == jnp.bfloat16
    expected = reference_attention(
        q.astype(jnp.float32),
        k.astype(jnp.float32),
        v.astype(jnp.float32),
        d_out.astype(jnp.float32),
        scale=0.25,
        causal=True,
        key_valid=None,
        slopes=None,
    )
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want, atol=0.05, rtol=0.05, err_msg=name
        )


def test_causal_visits_the_tiles_with_an_allowed_pair_and_masks_only_partial_ones():
    for q_len, kv_len, cq, ck in [
        (64, 64, 16, 16),
        (40, 64, 16, 8),
        (64, 24, 8, 16),
        (37, 37, 5, 7),
        (30, 50, 7, 4),
    ]:
        num_q, num_k = -(-q_len // cq), -(-kv_len // ck)
        config = chunked._Config(
            scale=1.0,
            causal=True,
            offset=kv_len - q_len,
            query_chunk=cq,
            key_chunk=ck,
            num_q_chunks=num_q,
            num_k_chunks=num_k,
        )
        # The rule on positions, padded ones included: the kernel computes them and drops them.
        query_pos = np.arange(num_q * cq) + kv_len - q_len
        key_pos = np.arange(num_k * ck)
        allowed = (key_pos[None, :] <= query_pos[:, None]).reshape(num_q, cq, num_k, ck)
        some_allowed, all_allowed = allowed.any(axis=(1, 3)), allowed.all(axis=(1, 3))

        by_query = [[int(x) for x in chunked._key_chunk_ranges(config, i)] for i in range(num_q)]
        by_key = [[int(x) for x in chunked._query_chunk_ranges(config, j)] for j in range(num_k)]
        j, i = np.arange(num_k)[None, :], np.arange(num_q)[:, None]
        unmasked_end, end = (np.array(r)[:, None] for r in zip(*by_query))
        start, unmasked_start = (np.array(r)[None, :] for r in zip(*by_key))
        np.testing.assert_array_equal(j < end, some_allowed)
        np.testing.assert_array_equal(j < unmasked_end, all_allowed)
        np.testing.assert_array_equal(i >= start, some_allowed)
        np.testing.assert_array_equal(i >= unmasked_start, all_allowed)
        if q_len == kv_len and cq == ck:
            # Square tiles on a square pattern: (n + 1) / 2n of the tiles, about half.
            assert some_allowed.sum() == num_q * (num_q + 1) // 2


def _grad_temp_bytes(attention, length, heads=2, head_dim=16):
    x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
    loss = lambda q, k, v: attention(q, k, v).sum()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_backward_never_stores_a_length_squared_array():
    length, heads = 4096, 2
    score_matrix_bytes = heads * length * length * 4  # 128 MiB
    chunked_bytes = _grad_temp_bytes(
        functools.partial(chunked_attention, causal=True, chunk_size=256), length, heads
    )
    # The measurement can see a score matrix: the plain JAX gradient of dense attention keeps one.
    dense_bytes = _grad_temp_bytes(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"), length, heads
    )
    assert dense_bytes >= score_matrix_bytes
    # Tiles of [heads, 256, 256] and a few length-sized arrays only.
    assert chunked_bytes < score_matrix_bytes / 16, (chunked_bytes, score_matrix_bytes)


def test_runs_inside_shard_map_and_pmap():
    devices = jax.devices()[:4]
    q, k, v, _ = random_inputs(5, 4, 33, 33, 2, 8, 8)
    key_valid = jnp.asarray(np.random.default_rng(5).random((4, 33)) > 0.2)
    attend = functools.partial(chunked_attention, causal=True, chunk_size=8)
    loss = lambda q, k, v, kv: attend(q, k, v, key_valid=kv).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))

    mesh = Mesh(np.array(devices), ("data",))
    spec = PartitionSpec("data")
    sharded = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 3))
    pmapped = jax.pmap(grads, devices=devices)
    expected = jax.jit(grads)(q, k, v, key_valid)
    split = lambda x: x.reshape(4, 1, *x.shape[1:])
    for got in (
        sharded(q, k, v, key_valid),
        [g.reshape(4, *g.shape[2:]) for g in pmapped(*map(split, (q, k, v, key_valid)))],
    ):
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_alibi_slopes_get_gradients_inside_shard_map():
    # Replicated slopes, per-device q/k/v: the slopes' gradient is the sum over the devices.
    q, k, v, _ = random_inputs(6, 4, 29, 29, 2, 8, 8)
    slopes = jnp.asarray([0.5, 0.125], jnp.float32)
    loss = lambda q, k, v, s: (chunked_attention(q, k, v, alibi_slopes=s, chunk_size=8) * q).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    spec = PartitionSpec("data")
    sharded = jax.jit(
        jax.shard_map(
            grads,
            mesh=mesh,
            in_specs=(spec,) * 3 + (PartitionSpec(),),
            out_specs=(spec,) * 3 + (PartitionSpec(),),
        )
    )
    for got, want in zip(sharded(q, k, v, slopes), jax.jit(grads)(q, k, v, slopes)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(key_valid=jnp.ones((2, 7), jnp.int32)), "key_valid must be boolean"),
        (dict(key_valid=jnp.ones((2, 6), bool)), r"key_valid must be boolean \[batch, kv_len\]"),
        (dict(alibi_slopes=jnp.ones(3)), r"alibi_slopes must be \[heads\]"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(chunk_size=(8, -1)), "chunk_size must be a positive int"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    q = jnp.ones((2, 5, 2, 4))
    k = jnp.ones((2, 7, 2, 4))
    with pytest.raises(ValueError, match=message):
        chunked_attention(q, k, k, **kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="must agree on batch and heads"):
        chunked_attention(jnp.ones((1, 5, 2, 4)), jnp.ones((1, 5, 3, 4)), jnp.ones((1, 5, 3, 4)))
    with pytest.raises(ValueError, match=r"\[batch, length, heads, head_dim\]"):
        chunked_attention(jnp.ones((5, 2, 4)), jnp.ones((5, 2, 4)), jnp.ones((5, 2, 4)))
