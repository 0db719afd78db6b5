"""Every attention implementation against a float64 NumPy reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, PartitionSpec

from transformer import patterns
from transformer.attention import block_sparse, dot_product_attention, splash, xla
from transformer.attention.auto import choose_implementation
from transformer.attention.block_sparse import plan as block_plan
from transformer.attention.block_sparse import xla_schedules
from transformer.attention.dot_product import IMPLEMENTATIONS


def reference(q, k, v, d_out, allowed, scale, slopes):
    """float64 NumPy attention and its gradients for the cotangent `d_out`.

    q: [b, q_len, h, d]; allowed: bool [b, q_len, kv_len]. Returns out, (dq, dk, dv).
    """
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if slopes is not None:
        distance = np.abs(np.arange(q.shape[1])[:, None] - np.arange(k.shape[1])[None, :])
        logits = logits - np.asarray(slopes, np.float64)[None, :, None, None] * distance
    allowed = allowed[:, None]
    logits = np.where(allowed, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(allowed, np.exp(logits - row_max), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    dv = np.einsum("bhqk,bqhd->bkhd", probs, d_out)
    d_probs = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    d_logits = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", d_logits, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", d_logits, q) * scale
    return out, (dq, dk, dv)


def forward_and_gradients(attend):
    """`attend(*inputs)` and its input gradients for a cotangent, as one jitted function
    `(d_out, *inputs) -> (out, *grads)`: one program to compile, where jax.vjp of a jitted
    function compiles the forward and the backward apart."""

    def run(d_out, *inputs):
        out, vjp = jax.vjp(attend, *inputs)
        return (out, *vjp(d_out))

    return jax.jit(run)


def random_inputs(seed, batch, q_len, kv_len, heads, head_dim=8, padding=False, alibi=False):
    rng = np.random.default_rng(seed)
    q, d_out = (
        rng.normal(size=(batch, q_len, heads, head_dim)).astype(np.float32) for _ in range(2)
    )
    k, v = (rng.normal(size=(batch, kv_len, heads, head_dim)).astype(np.float32) for _ in range(2))
    key_valid = None
    if padding:
        key_valid = rng.random((batch, kv_len)) < 0.7
        key_valid[-1] = False  # a whole sequence of padding: every query row is keyless
    slopes = rng.uniform(0.05, 0.5, heads).astype(np.float32) if alibi else None
    return q, k, v, d_out, key_valid, slopes


def check_against_reference(implementation, pattern, inputs, **options):
    q, k, v, d_out, key_valid, slopes = inputs
    mask = None if key_valid is None else jnp.asarray(key_valid)[:, None, None, :]

    def attend(q, k, v):
        return dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            alibi_slopes=slopes,
            pattern=pattern,
            implementation=implementation,
            **options,
        )

    out, *grads = forward_and_gradients(attend)(d_out, q, k, v)
    allowed = np.broadcast_to(
        pattern.mask(q.shape[1], k.shape[1]), (q.shape[0],) + (q.shape[1], k.shape[1])
    )
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    expected, expected_grads = reference(q, k, v, d_out, allowed, q.shape[-1] ** -0.5, slopes)
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), (out,) + tuple(grads), (expected,) + expected_grads
    ):
        got = np.asarray(got)
        assert np.isfinite(got).all(), f"{implementation}: NaN/inf in {name}"
        np.testing.assert_allclose(
            got, want, atol=2e-5, rtol=2e-4, err_msg=f"{implementation} {name} {pattern}"
        )
    keyless = ~allowed.any(-1)  # [batch, q_len]
    assert not np.asarray(out)[keyless].any(), "keyless queries must give zeros"
    assert not np.asarray(grads[0])[keyless].any(), "keyless queries must get zero gradients"


def primitive_patterns(max_block=6):
    return st.one_of(
        st.just(patterns.full()),
        st.just(patterns.causal()),
        st.builds(patterns.sliding_window, st.integers(0, 6), st.integers(0, 6)),
        st.builds(patterns.anchor, st.integers(1, 4)),
        st.builds(
            lambda p: patterns.anchor(positions=p),
            st.lists(st.integers(0, 30), min_size=1, max_size=3),
        ),
        st.builds(patterns.random, st.integers(1, 3), st.integers(1, max_block), st.integers(0, 9)),
        st.builds(
            lambda b, s: patterns.bigbird(block_size=b, seed=s),
            st.integers(1, 5),
            st.integers(0, 9),
        ),
        st.builds(patterns.strided, st.integers(1, 6)),
        st.builds(patterns.lra_local, st.integers(1, 6)),
        st.builds(patterns.prefix_lm, st.integers(0, 30)),
        st.just(patterns.predicate(lambda i, j: (i + 2 * j) % 5 < 2, "(i + 2j) % 5 < 2")),
    )


def composed_patterns():
    return st.recursive(
        primitive_patterns(),
        lambda children: st.one_of(
            st.builds(lambda a, b: a | b, children, children),
            st.builds(lambda a, b: a & b, children, children),
        ),
        max_leaves=3,
    )


@settings(max_examples=16, deadline=None)
@given(
    pattern=composed_patterns(),
    q_len=st.integers(1, 40),
    kv_len=st.integers(1, 40),
    block_q=st.integers(1, 12),
    block_kv=st.integers(1, 12),
    heads=st.integers(1, 3),
    padding=st.booleans(),
    alibi=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_sparse_matches_reference(
    pattern, q_len, kv_len, block_q, block_kv, heads, padding, alibi, seed
):
    inputs = random_inputs(seed, 2, q_len, kv_len, heads, padding=padding, alibi=alibi)
    q, k, v, d_out, key_valid, slopes = inputs
    mask = None if key_valid is None else jnp.asarray(key_valid)[:, None, None, :]

    def attend(q, k, v):
        return block_sparse.block_sparse_attention(
            q,
            k,
            v,
            pattern=pattern,
            key_valid=None if mask is None else mask[:, 0, 0],
            alibi_slopes=slopes,
            block_q=block_q,
            block_kv=block_kv,
        )

    out, *grads = forward_and_gradients(attend)(d_out, q, k, v)
    allowed = np.broadcast_to(pattern.mask(q_len, kv_len), (2, q_len, kv_len))
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    expected, expected_grads = reference(q, k, v, d_out, allowed, 8**-0.5, slopes)
    for got, want in zip((out,) + tuple(grads), (expected,) + expected_grads):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-4)


@settings(max_examples=12, deadline=None)
@given(
    pattern=composed_patterns(),
    length=st.integers(1, 33),
    padding=st.booleans(),
    alibi=st.booleans(),
    implementation=st.sampled_from(["dense", "xla", "auto"]),
    seed=st.integers(0, 2**16),
)
def test_dense_xla_and_auto_match_reference(pattern, length, padding, alibi, implementation, seed):
    inputs = random_inputs(seed, 2, length, length, 2, padding=padding, alibi=alibi)
    check_against_reference(implementation, pattern, inputs)


def test_xla_native_window_and_causal_with_padding_at_one_token():
    """A composed native pattern with key padding: its rows' "has a key" test must not trace
    the pattern's NumPy predicate (found by the property test above)."""
    pattern = patterns.causal() & patterns.sliding_window(0, 0)
    inputs = random_inputs(0, 2, 1, 1, 2, padding=True, alibi=False)
    check_against_reference("xla", pattern, inputs)


@pytest.mark.parametrize("pattern", [patterns.full(), patterns.causal()], ids=str)
@pytest.mark.parametrize("length", [1, 37])
def test_chunked_matches_reference(pattern, length):
    inputs = random_inputs(length, 2, length, length, 2, padding=True, alibi=True)
    check_against_reference("chunked", pattern, inputs)


@pytest.mark.parametrize(
    "pattern, padding",
    [
        (patterns.causal(), False),
        (patterns.bigbird(block_size=8, seed=1) & patterns.causal(), True),
        (patterns.strided(4) | patterns.prefix_lm(10), True),
    ],
    ids=str,
)
def test_splash_interpreted_matches_reference(pattern, padding):
    inputs = random_inputs(5, 2, 45, 45, 2, head_dim=8, padding=padding)
    check_against_reference("splash", pattern, inputs)


def marker_kernel(query, key, value, **_):
    """A stand-in for a kernel: 7 everywhere, so a test sees which branch computed a result."""
    return jnp.full(query.shape[:3] + value.shape[-1:], 7.0, query.dtype)


def test_splash_runs_its_kernel_on_finite_inputs_and_the_schedules_otherwise(monkeypatch):
    """Splash's kernel for finite inputs; block-sparse's schedules when q, k, v or a sink hold a
    NaN or inf (what those compute is test_nan_semantics'). The kernel, replaced by a marker,
    shows which branch ran; a sink of -inf is no sink, not a non-finite input."""
    monkeypatch.setattr(splash, "_kernel_attention", marker_kernel)
    q, k, v = (jnp.asarray(x) for x in np.random.default_rng(6).normal(size=(3, 2, 45, 2, 8)))
    attend = jax.jit(
        lambda q, k, v, sinks: splash.splash_attention(
            q, k, v, pattern=patterns.causal(), sinks=sinks
        )
    )
    no_sink = jnp.full((2,), -jnp.inf)
    assert (attend(q, k, v, None) == 7).all()
    assert (attend(q, k, v, no_sink) == 7).all()
    nan_key = k.at[1, 30, 0, 2].set(jnp.nan)
    for inputs in ((q, nan_key, v, None), (q, k, v.at[0, 3].set(jnp.inf), None)):
        out = np.asarray(attend(*inputs))
        assert not (out == 7).any()
        want = block_sparse.block_sparse_attention(*inputs[:3], pattern=patterns.causal())
        np.testing.assert_allclose(out, want, atol=1e-6)
    assert not (np.asarray(attend(q, k, v, jnp.array([0.0, jnp.nan]))) == 7).any()


def test_cudnn_runs_its_kernel_on_finite_inputs_and_the_schedules_otherwise(monkeypatch):
    """cuDNN's kernel for finite inputs; block-sparse's XLA schedules when q, k or v hold a NaN
    or inf. No GPU here: the backend is reported as one, and the kernel replaced by a marker
    shows which branch ran (what the schedules compute is test_nan_semantics')."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(xla, "_fused", marker_kernel)
    q, k, v = (jnp.asarray(x) for x in np.random.default_rng(7).normal(size=(3, 2, 45, 2, 16)))
    key_valid = jnp.arange(45)[None, :] < jnp.array([[45], [40]])
    options = dict(pattern=patterns.causal(), key_valid=key_valid)
    attend = jax.jit(lambda q, k, v: xla.cudnn_attention(q, k, v, **options))
    assert (attend(q, k, v) == 7).all()
    for inputs in ((q, k.at[1, 30, 0, 2].set(jnp.nan), v), (q, k, v.at[0, 3].set(-jnp.inf))):
        out = np.asarray(attend(*inputs))
        assert not (out == 7).any()
        want = block_sparse.block_sparse_attention(*inputs, **options)
        np.testing.assert_allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("implementation", ["block_sparse", "xla", "chunked"])
def test_named_bigbird_sizes_and_a_fully_padded_row(implementation):
    pattern = (
        patterns.full() if implementation == "chunked" else patterns.bigbird(block_size=16, seed=3)
    )
    inputs = random_inputs(1, 2, 130, 130, 2, head_dim=16, padding=True, alibi=False)
    check_against_reference(implementation, pattern, inputs)


def test_registry_and_errors():
    assert {"dense", "chunked", "block_sparse", "splash", "xla", "cudnn", "auto"} <= set(
        IMPLEMENTATIONS
    )
    x = jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match="unknown implementation 'flash'.*allowed"):
        dot_product_attention(x, x, x, implementation="flash")
    with pytest.raises(ValueError, match="'chunked' computes full\\(\\) and causal\\(\\)"):
        dot_product_attention(
            x, x, x, pattern=patterns.bigbird(block_size=2), implementation="chunked"
        )
    with pytest.raises(ValueError, match="only key padding masks of shape"):
        dot_product_attention(
            x, x, x, mask=jnp.ones((1, 1, 8, 8), bool), implementation="block_sparse"
        )
    with pytest.raises(ValueError, match="bias is supported by implementation='dense' only"):
        dot_product_attention(x, x, x, bias=jnp.zeros((1, 1, 8, 8)), implementation="xla")
    with pytest.raises(ValueError, match="splash' takes no alibi_slopes"):
        dot_product_attention(x, x, x, alibi_slopes=jnp.ones(2), implementation="splash")
    with pytest.raises(ValueError, match="pattern must be"):
        dot_product_attention(x, x, x, pattern=np.ones((8, 8), bool))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' needs a CUDA GPU"):
            dot_product_attention(x, x, x, implementation="cudnn")
    # Patterns by name.
    np.testing.assert_allclose(
        dot_product_attention(x, x, x * 2, pattern="causal", implementation="block_sparse"),
        dot_product_attention(x, x, x * 2, pattern=patterns.causal()),
        rtol=1e-6,
    )


def test_auto_choice():
    bigbird = patterns.bigbird()
    assert choose_implementation(bigbird, 1, 512, "cpu") == "dense"  # one decoding step
    assert choose_implementation(bigbird, 200, 200, "cpu") == "block_sparse"
    assert choose_implementation(patterns.full(), 200, 200, "cpu") == "chunked"
    assert choose_implementation(patterns.causal(), 200, 200, "cpu") == "chunked"
    assert choose_implementation(patterns.causal(), 512, 512, "cpu") == "block_sparse"
    assert choose_implementation(patterns.causal(), 640, 640, "cpu") == "block_sparse"
    assert choose_implementation(patterns.causal(), 768, 768, "cpu") == "chunked"
    assert choose_implementation(patterns.causal(), 1024, 1024, "cpu") == "chunked"
    # GPU: cuDNN only where it applies (tests/test_soft_cap_and_sinks.py), else block-sparse.
    assert choose_implementation(patterns.full(), 4096, 4096, "gpu") == "block_sparse"
    assert choose_implementation(patterns.causal(), 2048, 512, "cpu") == "block_sparse"  # offset
    assert choose_implementation(bigbird, 8192, 8192, "cpu") == "block_sparse"
    assert choose_implementation(bigbird, 8192, 8192, "tpu") == "splash"
    # Where block-sparse runs its fused CPU kernel, it takes full and causal attention too.
    for pattern in (patterns.full(), patterns.causal(), bigbird):
        for length in (64, 700, 4096):
            assert (
                choose_implementation(pattern, length, length, "cpu", cpu_kernel=True)
                == "block_sparse"
            )
    assert choose_implementation(bigbird, 1, 512, "cpu", cpu_kernel=True) == "dense"
    # Beyond what was measured: one query (padded to a block), and lengths past 16K.
    assert choose_implementation(patterns.full(), 1, 4096, "cpu", cpu_kernel=True) == "chunked"
    assert choose_implementation(patterns.full(), 32768, 32768, "cpu", cpu_kernel=True) == "chunked"
    assert (
        choose_implementation(patterns.full(), 4096, 4096, "gpu", cpu_kernel=True) == "block_sparse"
    )


def test_block_sparse_work_is_the_non_empty_blocks():
    pattern = patterns.bigbird()  # block 64, window of 3 blocks, 2 anchor and 3 random blocks
    for length in (4096, 8192):
        plan = block_sparse.make_plan(pattern, length, length, 64, 64)
        layout = pattern.block_layout(length, length, 64)
        assert plan.computed_blocks == (layout != patterns.EMPTY).sum()
        assert plan.kv_block.size <= 1.1 * plan.computed_blocks  # little padding of items
    small, large = (
        block_sparse.make_plan(pattern, n, n, 64, 64).computed_blocks for n in (8192, 16384)
    )
    assert 1.9 < large / small < 2.1  # linear in length


def test_block_sparse_under_shard_map_and_pmap():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 CPU devices"
    pattern = patterns.bigbird(block_size=4, seed=2) & patterns.causal()
    q, k, v, d_out, key_valid, _ = random_inputs(3, 8, 21, 21, 2, padding=True)
    mask = jnp.asarray(key_valid)[:, None, None, :]

    def loss(q, k, v, mask):
        out = dot_product_attention(
            q, k, v, mask=mask, pattern=pattern, implementation="block_sparse"
        )
        return (out * d_out[:1]).sum()

    def grads(q, k, v, mask):
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v, mask)

    expected = [
        jax.jit(grads)(q[i : i + 1], k[i : i + 1], v[i : i + 1], mask[i : i + 1]) for i in range(8)
    ]
    expected = [np.concatenate([e[j] for e in expected]) for j in range(3)]

    mesh = Mesh(np.array(devices), ("data",))
    sharded = jax.jit(
        jax.shard_map(
            grads, mesh=mesh, in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data")
        )
    )
    for got, want in zip(sharded(q, k, v, mask), expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-4)

    split = lambda x: x.reshape(8, 1, *x.shape[1:])
    mapped = jax.pmap(grads)(split(q), split(k), split(v), split(mask))
    for got, want in zip(mapped, expected):
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("padding, alibi", [(False, False), (True, True)])
@pytest.mark.parametrize("dense_rows_apart", [True, False])
def test_block_sparse_whole_rows_beside_row_pieces(monkeypatch, padding, alibi, dense_rows_apart):
    """BigBird's anchor rows see every key: they go to chunked attention, or (with ALiBi, or when
    told to keep them) to the online-softmax schedule, as they are too wide for one step, while
    the other rows are computed whole; all kinds must add up to the reference."""
    monkeypatch.setattr(block_plan, "_ROW_SCORES_PER_STEP", 8 * 8 * 8)
    if not dense_rows_apart:
        monkeypatch.setattr(block_plan, "_dense_rows", lambda *args: np.zeros(0, np.int64))
    block_sparse.make_plan.cache_clear()
    xla_schedules.attention_fn.cache_clear()
    pattern = patterns.bigbird(block_size=8, seed=4)
    plan = block_sparse.make_plan(pattern, 177, 177, 8, 8, dense_rows_apart=not alibi)
    anchor_rows = [0, 1]  # two anchor blocks of 8
    if dense_rows_apart and not alibi:
        assert plan.dense_q_blocks.tolist() == anchor_rows
        assert all(s.whole_rows for s in plan.schedules)
    else:
        assert not len(plan.dense_q_blocks)
        assert sorted(s.whole_rows for s in plan.schedules) == [False, True]
    inputs = random_inputs(7, 2, 177, 177, 2, padding=padding, alibi=alibi)
    q, k, v, d_out, key_valid, slopes = inputs

    def attend(q, k, v):
        return block_sparse.block_sparse_attention(
            q,
            k,
            v,
            pattern=pattern,
            key_valid=None if key_valid is None else jnp.asarray(key_valid),
            alibi_slopes=slopes,
            block_q=8,
        )

    out, *grads = forward_and_gradients(attend)(d_out, q, k, v)
    allowed = np.broadcast_to(pattern.mask(177, 177), (2, 177, 177))
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    expected, expected_grads = reference(q, k, v, d_out, allowed, 8**-0.5, slopes)
    for got, want in zip((out,) + tuple(grads), (expected,) + expected_grads):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-4)
    block_sparse.make_plan.cache_clear()
    xla_schedules.attention_fn.cache_clear()
