"""Ring attention (context parallelism) against the dense float64 reference, and its plan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from non_finite import INF, NAN, assert_like_reference

from transformer import patterns
from transformer.attention import ring
from transformer.attention.dot_product import dot_product_attention

BATCH, HEADS, HEAD_DIM, VALUE_DIM = 2, 2, 8, 4
PADDED, LENGTH = 32, 29  # 4 shards of 8; the real length ends inside the last shard


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("context",))


def _inputs(seed=0, length=PADDED, heads=HEADS, kv_heads=None):
    rng = np.random.default_rng(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = rng.normal(size=(BATCH, length, heads, HEAD_DIM)).astype(np.float32)
    k = rng.normal(size=(BATCH, length, kv_heads, HEAD_DIM)).astype(np.float32)
    v = rng.normal(size=(BATCH, length, kv_heads, VALUE_DIM)).astype(np.float32)
    weights = rng.normal(size=(BATCH, LENGTH, heads, VALUE_DIM)).astype(np.float32)
    valid = np.arange(length)[None, :] < LENGTH
    valid = np.repeat(valid, BATCH, axis=0)
    valid[1, 10] = False  # one more padded key inside a shard of the second sequence
    return q, k, v, valid, weights


def _reference(q, k, v, valid, weights, pattern, sinks=None, segment_ids=None, **options):
    """Output and gradients (q, k, v, and sinks when given) of sum(out * weights) over the real
    length, in float64."""
    with jax.enable_x64(True):
        arrays = [jnp.asarray(x[:, :LENGTH], jnp.float64) for x in (q, k, v)]
        if sinks is not None:
            arrays.append(jnp.asarray(sinks, jnp.float64))
        if segment_ids is not None:
            options["segment_ids"] = jnp.asarray(segment_ids[:, :LENGTH])
        mask = jnp.asarray(valid[:, None, None, :LENGTH])

        def loss(q, k, v, sinks=None):
            out = dot_product_attention(q, k, v, mask=mask, pattern=pattern, sinks=sinks, **options)
            return (out * weights).sum(), out

        argnums = tuple(range(len(arrays)))
        (_, out), grads = jax.value_and_grad(loss, argnums, has_aux=True)(*arrays)
        return np.asarray(out), [np.asarray(g) for g in grads]


def _ring(q, k, v, valid, weights, pattern, n=4, sinks=None, **options):
    mesh = _mesh(n)
    arrays = (q, k, v) if sinks is None else (q, k, v, sinks)

    def loss(q, k, v, sinks=None):
        out = ring.sharded_ring_attention(
            q,
            k,
            v,
            mesh=mesh,
            pattern=pattern,
            key_valid=valid,
            length=LENGTH,
            sinks=sinks,
            **options,
        )
        return (out[:, :LENGTH] * weights).sum(), out

    argnums = tuple(range(len(arrays)))
    step = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))
    (_, out), grads = step(*arrays)
    return np.asarray(out), [np.asarray(g) for g in grads]


def _check(ring_result, reference):
    out, grads = ring_result
    ref_out, ref_grads = reference
    np.testing.assert_allclose(out[:, :LENGTH], ref_out, atol=2e-5, rtol=1e-4)
    # Padded queries get zeros; padded positions get no gradient.
    np.testing.assert_array_equal(out[:, LENGTH:], 0.0)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad[:, :LENGTH], ref, atol=3e-5, rtol=1e-4, err_msg=name)
        np.testing.assert_array_equal(grad[:, LENGTH:], 0.0, err_msg=name)
    if len(grads) == 4:
        np.testing.assert_allclose(grads[3], ref_grads[3], atol=3e-5, rtol=1e-4, err_msg="sinks")


PATTERNS = {
    "full": patterns.full(),
    "causal": patterns.causal(),
    "sliding_window": patterns.sliding_window(3),
    "anchor": patterns.anchor(3),
    "bigbird": patterns.bigbird(block_size=4, num_random_blocks=1, seed=1),
    "causal_sliding_window": patterns.sliding_window(3) & patterns.causal(),
}


@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_forward_and_gradients_match_dense_float64(name, order):
    pattern = PATTERNS[name]
    q, k, v, valid, weights = _inputs()
    # Chunks of 4 in shards of 8: work is also skipped inside a pair.
    got = _ring(q, k, v, valid, weights, pattern, order=order, chunk=4)
    _check(got, _reference(q, k, v, valid, weights, pattern))


def test_alibi_and_scale_at_real_positions_in_zigzag_order():
    pattern = patterns.causal()
    q, k, v, valid, weights = _inputs(seed=1)
    slopes = np.array([0.5, 0.125], np.float32)
    options = dict(alibi_slopes=slopes, scale=0.3)
    got = _ring(q, k, v, valid, weights, pattern, order="zigzag", **options)
    _check(got, _reference(q, k, v, valid, weights, pattern, **options))


# Documents whose boundaries fall inside shards and inside chunks; the second sequence's
# first document ends at the padded key 10.
SEGMENT_IDS = np.stack(
    [np.repeat([0, 1, 2], [5, 14, 13]), np.repeat([3, 4, 5, 6], [11, 2, 16, 3])]
).astype(np.int32)


@pytest.mark.parametrize(
    "name, order, kv_heads", [("causal", "zigzag", 1), ("bigbird", "contiguous", 2)]
)
def test_soft_cap_sinks_grouped_heads_and_segment_ids_match_dense_float64(name, order, kv_heads):
    """Grouped-query (4 query heads on kv_heads), soft-capped, with sinks and packed documents,
    forward and gradients (the sinks' too), against dense float64."""
    pattern = PATTERNS[name]
    q, k, v, valid, weights = _inputs(seed=4, heads=4, kv_heads=kv_heads)
    sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    options = dict(logit_soft_cap=2.0, segment_ids=SEGMENT_IDS)
    got = _ring(q, k, v, valid, weights, pattern, sinks=sinks, order=order, chunk=4, **options)
    _check(got, _reference(q, k, v, valid, weights, pattern, sinks=sinks, **options))


def _no_key_for_query_5(i, j):
    return (j <= i) & (i != 5)


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    pattern = patterns.predicate(_no_key_for_query_5, "causal, query 5 sees nothing")
    q, k, v, valid, weights = _inputs(seed=2)
    valid[1] = False  # the second sequence has no valid key at all
    # Sinks do not give a row without keys anything, nor get a gradient from it.
    sinks = np.array([1.0, -0.5], np.float32)
    got = _ring(q, k, v, valid, weights, pattern, n=8, sinks=sinks)
    out, grads = got
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(out[:, 5], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    for grad in grads[:3]:
        np.testing.assert_array_equal(grad[1], 0.0)
    np.testing.assert_array_equal(grads[0][:, 5], 0.0)
    _check(got, _reference(q, k, v, valid, weights, pattern, sinks=sinks))


# (pattern, order, poisoned entries (array, index, value)); the second sequence pads key 10, and
# both pad every key from LENGTH on.
NON_FINITE = {
    "nan key, padded": ("causal", "zigzag", [("k", (1, 10), NAN)]),
    # Excluded from the earlier rows of its chunk (of 4) and shard, allowed in the later ones.
    "nan value, causal": ("causal", "zigzag", [("v", (0, 21), NAN)]),
    "nan value in a window": ("sliding_window", "contiguous", [("v", (0, 13, 1, 2), NAN)]),
    "nan query": ("sliding_window", "contiguous", [("q", (1, 6), NAN)]),
    "inf value": ("causal", "contiguous", [("v", (0, 20, 1, 2), INF)]),
    "-inf key": ("full", "contiguous", [("k", (1, 17, 0, 3), -INF)]),
    "inf query": ("bigbird", "contiguous", [("q", (0, 7, 0, 0), INF)]),
}


@functools.cache
def _ring_with_sinks(name, order):
    """jit((q, k, v, sinks, valid, weights) -> ((loss, out), (dq, dk, dv, d sinks))), compiled
    once per pattern and order."""
    mesh = _mesh(4)

    def loss(q, k, v, sinks, valid, weights):
        out = ring.sharded_ring_attention(
            q, k, v, mesh=mesh, pattern=PATTERNS[name], key_valid=valid, length=LENGTH,
            sinks=sinks, order=order, chunk=4,
        )  # fmt: skip
        return (out[:, :LENGTH] * weights).sum(), out

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_inputs_land_where_the_dense_reference_puts_them(case):
    """NaN and inf in queries, keys and values, with sinks: where NaN and +-inf land and the
    finite values, in the output and every gradient, equal the dense float64 reference's; what
    the mask excludes (padded keys, keys outside a row's pattern) reaches nothing."""
    name, order, where = NON_FINITE[case]
    q, k, v, valid, weights = _inputs(seed=5)
    arrays = dict(q=q, k=k, v=v)
    for array, index, value in where:
        arrays[array][index] = value
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    sinks = np.array([0.5, -1.0], np.float32)
    (_, out), grads = _ring_with_sinks(name, order)(q, k, v, sinks, valid, weights)
    want_out, want_grads = _reference(q, k, v, valid, weights, PATTERNS[name], sinks=sinks)
    got = [np.asarray(out)[:, :LENGTH]] + [np.asarray(g)[:, :LENGTH] for g in grads[:3]]
    got.append(np.asarray(grads[3]))
    names = ("out", "dq", "dk", "dv", "d sinks")
    assert_like_reference(got, [want_out, *want_grads], names, case, atol=3e-5, rtol=1e-4)
    # Every case but the excluded key reaches the output (an inf key entry times a query entry
    # of either sign gives logits of +inf too).
    assert np.isfinite(got[0]).all() == (case == "nan key, padded")
    np.testing.assert_array_equal(np.asarray(out)[:, LENGTH:], 0.0)


# ---------------------------------------------------------------------------------------------
# The plan.


def _kinds_from_mask(pattern, n, shard_len, length, order):
    """EMPTY/PARTIAL/FULL of each (query shard, key shard) pair from the dense mask."""
    positions = ring.shard_positions(n * shard_len, n, order)
    mask = np.zeros((n * shard_len,) * 2, bool)
    mask[:length, :length] = pattern.mask(length, length)
    pairs = mask[positions[:, None, :, None], positions[None, :, None, :]]
    return np.where(
        pairs.all((2, 3)), patterns.FULL, np.where(pairs.any((2, 3)), patterns.PARTIAL, 0)
    )


@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_plan_pairs_are_those_of_the_dense_mask(name, order):
    pattern = PATTERNS[name]
    plan = ring.plan_ring(pattern, 8, 8, 61, order)
    np.testing.assert_array_equal(plan.pair_kind, _kinds_from_mask(pattern, 8, 8, 61, order))
    # Every computed step has some device computing; skipped offsets are exactly those whose
    # pairs are empty on every device.
    devices = np.arange(8)
    for offset in range(8):
        needed = (plan.pair_kind[devices, (devices - offset) % 8] != 0).any()
        assert needed == (offset in [s.offset for s in plan.steps])
        assert needed != (offset in plan.skipped_offsets)


def test_sliding_window_narrower_than_a_shard_exchanges_with_neighbours_only():
    window = patterns.sliding_window(5)
    plans = {
        (n, shard_len): ring.plan_ring(window, n, shard_len, chunk=16)
        for n in (4, 8)
        for shard_len in (64, 128)
    }
    for (n, _), plan in plans.items():
        assert [s.offset for s in plan.steps] == [0, 1, n - 1]
        assert plan.skipped_offsets == tuple(range(2, n - 1))
        assert plan.exchanges == 2
        assert plan.sends_per_device().max() == 2
        # Each neighbour gets the one chunk of 16 keys next to it, not the whole shard: bytes
        # per device depend on the window (rounded up to a chunk), not on the shards.
        token = 1 * 4 * 128 * 4  # batch 1, 4 heads, key + value dims 64 + 64, float32
        assert plan.bytes_per_step(1, 4, 64) == (0, 16 * token, 16 * token)
        assert plan.bytes_per_device(1, 4, 64).max() == 2 * 16 * token
    # Full attention, by contrast, sends n - 1 whole shards per device.
    full = ring.plan_ring(patterns.full(), 8, 16)
    assert full.sends_per_device().tolist() == [7] * 8
    assert full.bytes_per_step(1, 4, 64) == (0,) + (16 * 1 * 4 * 128 * 4,) * 7


def test_compiled_ring_issues_only_the_planned_exchanges():
    """The skipped steps' ppermutes are absent from the program, forward and backward."""
    pattern = patterns.sliding_window(3)
    mesh = _mesh(8)
    x = jnp.zeros((1, 64, 1, 8))

    def forward(q):
        return ring.sharded_ring_attention(q, q, q, mesh=mesh, pattern=pattern).sum()

    forward_text = jax.jit(forward).lower(x).as_text()
    backward_text = jax.jit(jax.grad(forward)).lower(x).as_text()
    # Forward: the two neighbour exchanges, each of key and value.
    assert forward_text.count("collective_permute") == 2 * 2
    # Backward adds the keys again and the gradients' trips home, two arrays each.
    assert backward_text.count("collective_permute") == 2 * 2 + 2 * 2 + 2 * 2


def test_zigzag_balances_causal_work():
    contiguous = ring.plan_ring(patterns.causal(), 4, 16, order="contiguous", chunk=8)
    zigzag = ring.plan_ring(patterns.causal(), 4, 16, order="zigzag", chunk=8)
    # Contiguous: device i has i + 1 pairs, in chunk products 3, 7, 11, 15.
    assert contiguous.chunks_per_device().tolist() == [3, 7, 11, 15]
    assert zigzag.chunks_per_device().tolist() == [9, 9, 9, 9]
    assert zigzag.computed_chunks == contiguous.computed_chunks
    # The steps walk exactly those products, device by device.
    for plan in (contiguous, zigzag):
        walked = sum(step.counts for step in plan.steps)
        np.testing.assert_array_equal(walked, plan.chunks_per_device())


def test_zigzag_permutation_round_trip():
    perm = ring.zigzag_permutation(16, 4)
    assert perm.reshape(4, 4).tolist() == [
        [0, 1, 14, 15],
        [2, 3, 12, 13],
        [4, 5, 10, 11],
        [6, 7, 8, 9],
    ]
    x = jnp.arange(2 * 16).reshape(2, 16)
    np.testing.assert_array_equal(ring.from_zigzag(ring.to_zigzag(x, 4), 4), x)
    # Inputs fed in zig-zag order already (reorder=False) give the output in that order.
    q, k, v, _, _ = _inputs(seed=3)
    options = dict(mesh=_mesh(4), pattern=patterns.causal(), order="zigzag")
    natural = jax.jit(functools.partial(ring.sharded_ring_attention, **options))(q, k, v)
    ordered = [ring.to_zigzag(x, 4) for x in (q, k, v)]
    fed = jax.jit(functools.partial(ring.sharded_ring_attention, reorder=False, **options))(
        *ordered
    )
    np.testing.assert_allclose(fed, ring.to_zigzag(natural, 4), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_numbers():
    q = jnp.zeros((1, 30, 1, 8))
    with pytest.raises(ValueError, match=r"length 30 does not divide into 4 shards.*32"):
        ring.sharded_ring_attention(q, q, q, mesh=_mesh(4))
    q = jnp.zeros((1, 36, 1, 8))
    with pytest.raises(ValueError, match=r"length 36 does not divide into 2 x 4 zig-zag"):
        ring.sharded_ring_attention(q, q, q, mesh=_mesh(4), order="zigzag")
    with pytest.raises(ValueError, match=r"no axis 'sequence'.*'context'"):
        ring.sharded_ring_attention(q, q, q, mesh=_mesh(4), axis_name="sequence")
    inside = jax.shard_map(
        lambda x: ring.ring_attention(x, x, x, axis_name="sequence"),
        mesh=_mesh(4),
        in_specs=P(None, "context"),
        out_specs=P(None, "context"),
    )
    with pytest.raises(ValueError, match=r"no mesh axis 'sequence'"):
        inside(q)
    three_heads = jnp.zeros((1, 36, 3, 8))
    with pytest.raises(ValueError, match=r"key/value heads \(2\) dividing the query's heads \(3\)"):
        ring.sharded_ring_attention(three_heads, *[jnp.zeros((1, 36, 2, 8))] * 2, mesh=_mesh(4))
    with pytest.raises(ValueError, match=r"segment_ids must be \[batch, shard_len\] = \[1, 9\]"):
        jax.shard_map(
            lambda x: ring.ring_attention(x, x, x, segment_ids=jnp.zeros((1, 36), int)),
            mesh=_mesh(4),
            in_specs=P(None, "context"),
            out_specs=P(None, "context"),
        )(q)
    with pytest.raises(ValueError, match=r"length 40 must be in \[1, 36\]"):
        ring.plan_ring(patterns.causal(), 4, 9, 40)
    with pytest.raises(ValueError, match=r"chunk must divide .* 8 tokens; got 3"):
        ring.plan_ring(patterns.causal(), 4, 8, chunk=3)
