"""Packed documents: `dot_product_attention(..., segment_ids=...)` lets a query see a key only
when their segment ids are equal (and the pattern and the mask allow it). Checked against the
float64 reference with the segments in its allowed pairs: forward and gradients, odd lengths,
key padding, rows with no key left, the soft cap and sinks, two pattern families, both forms
(one array for self-attention, a pair for queries and keys); the fused CPU kernel, which skips
the blocks whose documents cannot meet; and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_implementations import forward_and_gradients
from test_block_sparse_cpu import uses_kernel
from test_soft_cap_and_sinks import CAP, allowed_pairs, random_sinks, reference

from transformer import patterns
from transformer.attention import block_sparse_attention, chunked_attention, dot_product_attention
from transformer.attention.block_sparse import cpu_kernel


def run(q, k, v, d_out, sinks, mask, pattern, segment_ids, implementation):
    def attend(q, k, v, sinks):
        return dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            pattern=pattern,
            segment_ids=segment_ids,
            logit_soft_cap=CAP,
            sinks=sinks,
            implementation=implementation,
        )

    out, vjp = jax.vjp(attend, q, k, v, sinks)
    return (out, *vjp(d_out))


def check(q, k, v, d_out, key_valid, pattern, q_segments, kv_segments, segment_ids, impl):
    sinks = random_sinks(0, q.shape[2])
    mask = jnp.asarray(key_valid)[:, None, None, :]
    jitted = jax.jit(run, static_argnums=(6, 8))
    got = jitted(q, k, v, d_out, sinks, mask, pattern, segment_ids, impl)
    allowed = allowed_pairs(pattern, q.shape[1], k.shape[1], key_valid, q.shape[0])
    allowed = allowed & (q_segments[:, :, None] == kv_segments[:, None, :])
    expect_reference(got, q, k, v, d_out, sinks, allowed, str(pattern))
    # The segments matter: without them the output differs.
    plain = dot_product_attention(
        q, k, v, mask=mask, pattern=pattern, logit_soft_cap=CAP, sinks=jnp.asarray(sinks)
    )
    assert np.abs(np.asarray(plain) - np.asarray(got[0])).max() > 1e-3


def expect_reference(got, q, k, v, d_out, sinks, allowed, label):
    """got = (out, dq, dk, dv, d_sinks) against the float64 reference (soft cap CAP) over the
    `allowed` pairs `[batch, q_len, kv_len]`, with zeros where a query sees no key."""
    group = q.shape[2] // k.shape[2]  # grouped-query: the reference sees repeated keys
    repeat = lambda x: np.repeat(x, group, axis=2)
    out, grads = reference(
        q, repeat(k), repeat(v), d_out, allowed, q.shape[-1] ** -0.5, cap=CAP, sinks=sinks
    )
    fold = lambda g: g.reshape(*g.shape[:2], -1, group, g.shape[-1]).sum(3)
    grads = (grads[0], fold(grads[1]), fold(grads[2]), grads[3])
    for name, g, want in zip(("out", "dq", "dk", "dv", "d_sinks"), got, (out, *grads)):
        scale = 10.0 if name == "d_sinks" else 1.0
        np.testing.assert_allclose(
            np.asarray(g), want, atol=3e-5 * scale, rtol=3e-4, err_msg=f"{name} {label}"
        )
    keyless = ~allowed.any(-1)
    assert keyless.any(), "the inputs must have rows with no key"
    assert not np.asarray(got[0])[keyless].any() and not np.asarray(got[1])[keyless].any()


def arrays(seed, batch, q_len, kv_len, heads=2, head_dim=8, kv_heads=None):
    rng = np.random.default_rng(seed)
    kv_heads = kv_heads or heads
    q, d_out = (rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32) for _ in "qo")
    k, v = (rng.normal(size=(batch, kv_len, kv_heads, head_dim)).astype(np.float32) for _ in "kv")
    return q, k, v, d_out


# At head dim 8 block_sparse runs XLA's schedules (the kernel takes multiples of 16; test_kernel
# below checks it).
@pytest.mark.parametrize(
    "pattern, implementation, kv_heads",
    [
        (patterns.causal(), "dense", 2),
        (patterns.sliding_window(4, 2), "dense", 2),
        (patterns.causal(), "block_sparse", 2),
        (patterns.sliding_window(4, 2) | patterns.anchor(2), "block_sparse", 1),
        (patterns.causal(), "chunked", 1),
        (patterns.sliding_window(4, 2), "splash", 1),
    ],
    ids=[
        "dense causal",
        "dense window",
        "block_sparse causal",
        "block_sparse window+anchor mqa",
        "chunked causal mqa",
        "splash window mqa",
    ],
)
def test_packed_self_attention(pattern, implementation, kv_heads):
    q, k, v, d_out = arrays(1, 2, 31, 31, kv_heads=kv_heads)
    # Row 0: three documents; row 1: one, and a document of one padded token at the end.
    segments = np.array([[0] * 10 + [1] * 13 + [2] * 8, [7] * 30 + [8]], np.int32)
    key_valid = np.ones((2, 31), bool)
    key_valid[1, 30] = False  # the last document's only key is padding: its query sees nothing
    key_valid[0, 10] = False
    ids = jnp.asarray(segments)
    check(q, k, v, d_out, key_valid, pattern, segments, segments, ids, implementation)


@pytest.mark.parametrize("implementation", ["dense", "chunked", "block_sparse", "auto"])
def test_a_pair_of_query_and_key_segment_ids(implementation):
    q, k, v, d_out = arrays(2, 2, 9, 14)
    q_segments = np.array([[0, 0, 0, 1, 1, 1, 1, 3, 3], [2] * 9], np.int32)  # 3: no key
    kv_segments = np.array([[0] * 5 + [1] * 9, [2] * 7 + [4] * 7], np.int32)
    key_valid = np.ones((2, 14), bool)
    segment_ids = (jnp.asarray(q_segments), jnp.asarray(kv_segments))
    check(
        q,
        k,
        v,
        d_out,
        key_valid,
        patterns.full(),
        q_segments,
        kv_segments,
        segment_ids,
        implementation,
    )


# The fused CPU kernel (head dims of 16, blocks of 16): documents that straddle blocks, ids out
# of order (document 5 twice) and a document of one padded key (its query sees nothing), so its
# walks keep, skip and split blocks per batch row.
SELF_IDS = np.array(
    [[0] * 20 + [1] * 9 + [2] * 32, [5] * 16 + [3] * 16 + [7] + [5] * 7 + [9] * 21], np.int32
)
KERNEL_CASES = {
    # pattern, kv_heads, (q_len, kv_len)
    "causal": (patterns.causal(), 4, (61, 61)),
    "window gqa": (patterns.sliding_window(10, 3), 2, (61, 61)),
    "bigbird mqa": (patterns.bigbird(16, 3, 1, 1), 1, (61, 61)),
    "full, a pair of ids": (patterns.full(), 2, (45, 70)),
}


def kernel_inputs(q_len, kv_len, kv_heads):
    q, k, v, d_out = arrays(6, 2, q_len, kv_len, heads=4, head_dim=16, kv_heads=kv_heads)
    key_valid = np.ones((2, kv_len), bool)
    key_valid[1, 32] = False
    key_valid[0, 25] = False
    if q_len == kv_len:
        return (q, k, v, d_out), key_valid, SELF_IDS, SELF_IDS
    q_ids = np.array([[0] * 15 + [1] * 30, [4] * 20 + [2] * 24 + [8]], np.int32)  # 8: no key
    kv_ids = np.array([[0] * 17 + [1] * 40 + [0] * 13, [2] * 32 + [4] * 38], np.int32)
    return (q, k, v, d_out), key_valid, q_ids, kv_ids


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel(case):
    """The kernel with segment ids, soft cap and sinks, forward and gradients, is the path
    taken (its forward and backward calls in the compiled computation)."""
    if cpu_kernel.unavailable() is not None:
        pytest.skip(cpu_kernel.unavailable())
    pattern, kv_heads, (q_len, kv_len) = KERNEL_CASES[case]
    (q, k, v, d_out), key_valid, q_ids, kv_ids = kernel_inputs(q_len, kv_len, kv_heads)
    sinks = random_sinks(3, q.shape[2])
    segment_ids = (jnp.asarray(q_ids), jnp.asarray(kv_ids))

    def attend(q, k, v, sinks):
        return block_sparse_attention(
            q,
            k,
            v,
            pattern=pattern,
            key_valid=jnp.asarray(key_valid),
            segment_ids=segment_ids,
            logit_soft_cap=CAP,
            sinks=sinks,
            block_q=16,
        )

    loss = lambda q, k, v, sinks: (attend(q, k, v, sinks) * d_out).sum()
    assert uses_kernel(jax.grad(loss, (0, 1, 2, 3)), q, k, v, sinks) == (True, True)
    got = forward_and_gradients(attend)(d_out, q, k, v, sinks)
    allowed = allowed_pairs(pattern, q_len, kv_len, key_valid, 2)
    allowed = allowed & (q_ids[:, :, None] == kv_ids[:, None, :])
    expect_reference(got, q, k, v, d_out, sinks, allowed, case)


def test_bad_segment_ids_are_named():
    q = jnp.zeros((2, 6, 2, 8))
    k = jnp.zeros((2, 7, 2, 8))
    ids = jnp.zeros((2, 6), jnp.int32)
    with pytest.raises(ValueError, match="one segment_ids array is for self-attention"):
        dot_product_attention(q, k, k, segment_ids=ids)
    with pytest.raises(ValueError, match=r"kv_segment_ids must have shape .* \(2, 7\)"):
        dot_product_attention(q, k, k, segment_ids=(ids, ids))
    with pytest.raises(ValueError, match="q_segment_ids must have an integer dtype"):
        dot_product_attention(q, q, q, segment_ids=ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="a pair"):
        dot_product_attention(q, q, q, segment_ids=(ids,))
    with pytest.raises(ValueError, match="segment_ids is computed by implementations"):
        dot_product_attention(q, q, q, segment_ids=ids, implementation="xla")


@pytest.mark.parametrize("implementation", ["dense", "chunked", "block_sparse", "kernel"])
def test_a_nan_in_another_document_stays_out(implementation):
    """A NaN key and value in document 0 make document 0's rows that see them NaN, as in the
    reference, and never reach document 1's outputs or gradients (0 * NaN = NaN in a plain
    product would). "kernel": block_sparse at head dim 16, where the CPU kernel computes it."""
    if implementation == "kernel" and cpu_kernel.unavailable() is not None:
        pytest.skip(cpu_kernel.unavailable())
    head_dim = 16 if implementation == "kernel" else 8
    implementation = "block_sparse" if implementation == "kernel" else implementation
    q, k, v, d_out = arrays(4, 1, 24, 24, head_dim=head_dim)
    segments = jnp.asarray([[0] * 10 + [1] * 14], jnp.int32)
    k[0, 3, 0, 0] = np.nan
    v[0, 3, 1, 0] = np.nan

    def attend(q, k, v):
        return dot_product_attention(
            q, k, v, segment_ids=segments, implementation=implementation, pattern=patterns.full()
        )

    out, vjp = jax.vjp(attend, q, k, v)
    dq, dk, dv = vjp(jnp.asarray(d_out))
    for name, x in (("out", out), ("dq", dq)):
        assert np.isfinite(np.asarray(x)[0, 10:]).all(), f"{name}: NaN in document 1"
        assert np.isnan(np.asarray(x)[0, :10]).any(), f"{name}: document 0 must see its NaN"
    for name, x in (("dk", dk), ("dv", dv)):
        assert np.isfinite(np.asarray(x)[0, 10:]).all(), f"{name}: NaN in document 1's keys"
    clean = lambda x: np.where(np.isnan(x), 0.0, x)
    want = jax.nn.dot_product_attention(q[:, 10:], clean(k)[:, 10:], clean(v)[:, 10:])
    np.testing.assert_allclose(np.asarray(out)[:, 10:], np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_chunked_in_small_tiles_equals_dense(causal):
    """Chunked attention in 8 x 16 tiles (tiles that hold several documents, GQA heads folded
    into the rows) against the dense path checked above."""
    q, k, v, d_out = arrays(5, 2, 37, 37, heads=4, kv_heads=2)
    ids = jnp.asarray([[0] * 12 + [1] * 3 + [2] * 22, [4] * 20 + [5] * 17], jnp.int32)
    key_valid = jnp.asarray(np.random.default_rng(5).random((2, 37)) < 0.8)
    sinks = jnp.asarray(random_sinks(5, 4))
    pattern = patterns.causal() if causal else patterns.full()

    def chunked(q, k, v, sinks):
        return chunked_attention(
            q,
            k,
            v,
            causal=causal,
            key_valid=key_valid,
            segment_ids=(ids, ids),
            logit_soft_cap=CAP,
            sinks=sinks,
            chunk_size=(8, 16),
        )

    def dense(q, k, v, sinks):
        return dot_product_attention(
            q,
            k,
            v,
            mask=key_valid[:, None, None, :],
            pattern=pattern,
            segment_ids=ids,
            logit_soft_cap=CAP,
            sinks=sinks,
        )

    for name, got, want in zip(
        ("out", "dq", "dk", "dv", "d_sinks"),
        forward_and_gradients(chunked)(d_out, q, k, v, sinks),
        forward_and_gradients(dense)(d_out, q, k, v, sinks),
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=name)
