"""Grouped-query and multi-query attention (key/value with kv_heads heads, kv_heads dividing the
query's heads) in every implementation that takes it, against a float64 reference that repeats
the keys and values explicitly (here only): forward and gradients, odd lengths, key padding
with a fully padded row, the soft cap, sinks and ALiBi, several pattern families. Also: no
implementation builds keys or values repeated to the query's heads (read off the jaxpr), the
errors, and the module's num_kv_heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from test_block_sparse_cpu import uses_kernel
from test_soft_cap_and_sinks import CAP, allowed_pairs, random_sinks, reference

from transformer import patterns
from transformer.attention import block_sparse_attention, chunked_attention, dot_product_attention
from transformer.attention.block_sparse import cpu_kernel
from transformer.modules.layers import LayerConfig
from transformer.modules.multihead_attention import MultiHeadAttention

HEADS = 4
HEAD_DIM = 16  # a multiple of 16: the CPU kernel's


def inputs(seed, kv_heads, q_len=29, kv_len=29, batch=2, alibi=False):
    """q, d_out `[batch, q_len, HEADS, HEAD_DIM]`; k, v `[batch, kv_len, kv_heads, HEAD_DIM]`;
    key_valid with a fully padded last row; ALiBi slopes `[HEADS]` or None."""
    rng = np.random.default_rng(seed)
    q, d_out = (rng.normal(size=(batch, q_len, HEADS, HEAD_DIM)).astype(np.float32) for _ in "qo")
    k, v = (rng.normal(size=(batch, kv_len, kv_heads, HEAD_DIM)).astype(np.float32) for _ in "kv")
    key_valid = rng.random((batch, kv_len)) < 0.7
    key_valid[-1] = False
    slopes = rng.uniform(0.05, 0.5, HEADS).astype(np.float32) if alibi else None
    return q, k, v, d_out, key_valid, slopes


def grouped_reference(q, k, v, d_out, allowed, *, slopes, cap, sinks):
    """The float64 reference with k and v repeated to the query's heads (query head n reads
    key/value head n // group); dk and dv summed back over each group."""
    group = q.shape[2] // k.shape[2]
    repeat = lambda x: np.repeat(np.asarray(x, np.float64), group, axis=2)
    out, (dq, dk, dv, d_sinks) = reference(
        q, repeat(k), repeat(v), d_out, allowed, HEAD_DIM**-0.5, slopes=slopes, cap=cap, sinks=sinks
    )
    fold = lambda g: g.reshape(*g.shape[:2], -1, group, g.shape[-1]).sum(3)
    return out, (dq, fold(dk), fold(dv), d_sinks)


def check(attend, pattern, data, *, cap=None, sinks=None, label="", atol=3e-5, rtol=3e-4):
    """attend(q, k, v, sinks, key_valid) against `grouped_reference`, forward and gradients."""
    q, k, v, d_out, key_valid, slopes = data

    def run(q, k, v, sinks, d_out):
        out, vjp = jax.vjp(
            lambda q, k, v, s: attend(q, k, v, s, jnp.asarray(key_valid)), q, k, v, sinks
        )
        return (out, *vjp(d_out))

    sinks_in = None if sinks is None else jnp.asarray(sinks)
    got = jax.jit(run)(q, k, v, sinks_in, d_out)
    allowed = allowed_pairs(pattern, q.shape[1], k.shape[1], key_valid, q.shape[0])
    out, grads = grouped_reference(q, k, v, d_out, allowed, slopes=slopes, cap=cap, sinks=sinks)
    for name, g, want in zip(("out", "dq", "dk", "dv", "d_sinks"), got, (out, *grads)):
        if want is None:
            continue
        assert g.shape == want.shape, f"{label} {name}: shape {g.shape} != {want.shape}"
        scale = 10.0 if name == "d_sinks" else 1.0
        np.testing.assert_allclose(
            np.asarray(g), want, atol=atol * scale, rtol=rtol, err_msg=f"{label} {name} {pattern}"
        )
    keyless = ~allowed.any(-1)
    assert keyless.any() and not np.asarray(got[0])[keyless].any(), f"{label}: keyless rows"


PATTERNS = {
    "full": patterns.full(),
    "causal": patterns.causal(),
    "sliding_window": patterns.sliding_window(5, 2),
    "bigbird": patterns.bigbird(block_size=4, seed=1) & patterns.causal(),
    "random": patterns.random(2, 4, seed=3),
    "predicate": patterns.predicate(lambda i, j: (i + 2 * j) % 5 < 2, "(i + 2j) % 5 < 2"),
}


def entry(implementation, pattern, slopes=None, cap=None):
    def attend(q, k, v, sinks, key_valid):
        return dot_product_attention(
            q,
            k,
            v,
            mask=key_valid[:, None, None, :],
            pattern=pattern,
            implementation=implementation,
            alibi_slopes=slopes,
            logit_soft_cap=cap,
            sinks=sinks,
        )

    return attend


@pytest.mark.parametrize(
    "kv_heads, names",
    [(2, ["causal", "sliding_window", "bigbird", "predicate"]), (1, ["full", "random"])],
    ids=["gqa", "mqa"],
)
def test_dense_every_pattern_family(kv_heads, names):
    data = inputs(kv_heads, kv_heads, alibi=True)
    sinks = random_sinks(kv_heads, HEADS)
    for name in names:
        pattern = PATTERNS[name]
        attend = entry("dense", pattern, slopes=data[-1], cap=CAP)
        check(attend, pattern, data, cap=CAP, sinks=sinks, label=f"dense {name}")


@pytest.mark.parametrize(
    "causal, kv_heads, alibi", [(False, 2, True), (True, 1, False)], ids=["full", "causal"]
)
def test_chunked(causal, kv_heads, alibi):
    data = inputs(3, kv_heads, q_len=37, kv_len=37, alibi=alibi)
    sinks = random_sinks(3, HEADS)

    def attend(q, k, v, sinks, key_valid):
        return chunked_attention(
            q,
            k,
            v,
            causal=causal,
            key_valid=key_valid,
            alibi_slopes=data[-1],
            logit_soft_cap=CAP,
            sinks=sinks,
            chunk_size=(8, 16),
        )

    pattern = patterns.causal() if causal else patterns.full()
    check(attend, pattern, data, cap=CAP, sinks=sinks, label="chunked")


# (pattern, kv_heads, use_kernel, alibi): the kernel (no ALiBi) and XLA's schedules, whole-row
# and row-piece schedules, MQA and GQA.
BLOCK_SPARSE_CASES = {
    "kernel, window, gqa": ("sliding_window", 2, True, False),
    "kernel, bigbird, mqa": ("bigbird", 1, True, False),
    "kernel, predicate, gqa": ("predicate", 2, True, False),
    "xla, causal, mqa, alibi": ("causal", 1, False, True),
    "xla, random, gqa, alibi": ("random", 2, False, True),
    "xla, bigbird, gqa": ("bigbird", 2, False, False),
}


@pytest.mark.parametrize("case", list(BLOCK_SPARSE_CASES))
def test_block_sparse(case):
    name, kv_heads, use_kernel, alibi = BLOCK_SPARSE_CASES[case]
    if use_kernel and cpu_kernel.unavailable() is not None:
        pytest.skip(cpu_kernel.unavailable())
    pattern = PATTERNS[name]
    data = inputs(7, kv_heads, q_len=37, kv_len=41, alibi=alibi)
    sinks = random_sinks(7, HEADS)

    def attend(q, k, v, sinks, key_valid):
        return block_sparse_attention(
            q,
            k,
            v,
            pattern=pattern,
            key_valid=key_valid,
            alibi_slopes=data[-1],
            logit_soft_cap=CAP,
            sinks=sinks,
            block_q=16,
            use_kernel=use_kernel,
        )

    q, k, v = data[:3]
    uses = uses_kernel(lambda q, k, v: attend(q, k, v, None, jnp.asarray(data[4])), q, k, v)
    assert uses[0] == use_kernel, f"{case}: kernel used: {uses}"
    check(attend, pattern, data, cap=CAP, sinks=sinks, label=case)


def test_xla_and_auto_and_splash():
    """jax.nn.dot_product_attention's own GQA (no cap or sinks there); "auto"; splash's GQA
    (interpreted off TPU), with the cap and sinks."""
    data = inputs(11, 2, q_len=21, kv_len=27)
    check(entry("xla", patterns.causal()), patterns.causal(), data, label="xla")
    sinks = random_sinks(11, HEADS)
    window = patterns.sliding_window(6)
    check(entry("auto", window, cap=CAP), window, data, cap=CAP, sinks=sinks, label="auto")
    check(entry("splash", window, cap=CAP), window, data, cap=CAP, sinks=sinks, label="splash")


def test_the_reference_repeats_what_a_plain_multi_head_call_would_see():
    """The grouped reference equals a plain multi-head call given repeated keys and values, so
    the check above compares against the maths of jax.nn.dot_product_attention's GQA."""
    q, k, v, d_out, key_valid, _ = inputs(13, 2)
    repeated = [np.repeat(x, 2, axis=2) for x in (k, v)]
    want = jax.nn.dot_product_attention(q, *repeated, mask=jnp.asarray(key_valid)[:, None, None])
    got = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(key_valid)[:, None, None])
    rows = key_valid.any(-1)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-6)
    allowed = allowed_pairs(patterns.full(), 29, 29, key_valid, 2)
    out, _ = grouped_reference(q, k, v, d_out, allowed, slopes=None, cap=None, sinks=None)
    np.testing.assert_allclose(out[rows], np.asarray(want)[rows], atol=1e-5)


# --- No repeated keys or values ----------------------------------------------------------


def _avals(jaxpr):
    """Every intermediate's shape in `jaxpr` and the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from _avals(sub)


def repeated_key_shapes(fn, q, k, v, kv_lengths):
    """Shapes of intermediates in fn's forward+backward jaxpr that hold keys or values repeated
    to the query's heads: a dimension of `heads` and one of head_dim, and exactly
    batch x heads x kv_length x head_dim elements for a kv_length in `kv_lengths` (the length,
    or padded to blocks)."""
    heads, batch = q.shape[2], q.shape[0]
    grad = jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(grad)(q, k, v).jaxpr
    sizes = {batch * heads * n * HEAD_DIM for n in kv_lengths}
    return {s for s in _avals(jaxpr) if heads in s and HEAD_DIM in s and int(np.prod(s)) in sizes}


@pytest.mark.parametrize("implementation", ["dense", "kernel", "xla_schedules", "chunked"])
def test_no_implementation_repeats_keys_or_values(implementation):
    """Read off the jaxpr (the kernel's calls included): no intermediate of the forward or
    backward pass holds the keys or values at the query's 6 heads, where a repeat would. The
    same check run on keys repeated beforehand finds them, so it can fail."""
    if implementation == "kernel" and cpu_kernel.unavailable() is not None:
        pytest.skip(cpu_kernel.unavailable())
    rng = np.random.default_rng(0)
    # 6 heads over 2; q_len 24 < kv_len 40 (48 in blocks of 16), so that no query-sized array
    # has a key-sized number of elements.
    q = jnp.asarray(rng.normal(size=(1, 24, 6, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 40, 2, HEAD_DIM)), jnp.float32) for _ in "kv")
    pattern = patterns.causal() if implementation == "chunked" else patterns.sliding_window(9)
    if implementation == "dense":
        fn = lambda q, k, v: dot_product_attention(q, k, v, pattern=pattern)
    elif implementation == "chunked":
        fn = lambda q, k, v: chunked_attention(q, k, v, chunk_size=(8, 16))
    else:
        fn = lambda q, k, v: block_sparse_attention(
            q, k, v, pattern=pattern, block_q=16, use_kernel=implementation == "kernel"
        )
    lengths = (40, 48)
    assert repeated_key_shapes(fn, q, k, v, lengths) == set()
    repeat = lambda q, k, v: fn(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
    assert repeated_key_shapes(repeat, q, k, v, lengths), "the check must see a repeat"


# --- Errors and the module ----------------------------------------------------------------


def test_a_kv_heads_that_does_not_divide_heads_is_refused():
    q = jnp.zeros((1, 8, 6, 16))
    k = jnp.zeros((1, 8, 4, 16))
    with pytest.raises(ValueError, match=r"key/value heads \(4\) dividing the query's heads \(6\)"):
        dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="sinks must have shape \\[heads\\] = \\(6,\\)"):
        dot_product_attention(q, k[:, :, :2], k[:, :, :2], sinks=jnp.zeros(2))
    with pytest.raises(ValueError, match="'lra_local' needs as many key/value heads"):
        dot_product_attention(
            q, k[:, :, :2], k[:, :, :2], pattern=patterns.lra_local(4), implementation="lra_local"
        )
    with pytest.raises(ValueError, match="num_kv_heads must be None .* dividing num_heads 8"):
        LayerConfig(num_heads=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LayerConfig(num_heads=8, num_kv_heads=2, implementation="lra_local")


def test_the_module_projects_kv_heads_and_equals_the_repeated_call():
    """num_kv_heads=2 of 4: the key/value kernels have 2 heads, and the output equals
    num_kv_heads=None with the key and value kernels repeated per head (MHA with tied heads)."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 32))
    grouped = MultiHeadAttention(num_heads=4, num_kv_heads=2, features=32, implementation="dense")
    params = grouped.init(jax.random.key(1), x)["params"]
    assert params["key"]["kernel"].shape == (32, 2, 8)
    assert params["query"]["kernel"].shape == (32, 4, 8)
    repeated = jax.tree.map(lambda p: p, params)
    for name in ("key", "value"):
        repeated[name] = {
            "kernel": jnp.repeat(params[name]["kernel"], 2, axis=1),
            "bias": jnp.repeat(params[name]["bias"], 2, axis=0),
        }
    plain = MultiHeadAttention(num_heads=4, features=32, implementation="dense")
    np.testing.assert_allclose(
        grouped.apply({"params": params}, x),
        plain.apply({"params": repeated}, x),
        atol=1e-5,
    )
