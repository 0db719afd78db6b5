"""Logit soft-capping and attention sinks in every implementation that takes them, against a
float64 NumPy reference: forward and gradients (d sinks too), odd lengths, key padding with a
fully padded row, every pattern family, NaN and inf as the dense reference has them; the
errors; and "auto"'s GPU rule as a pure function."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from non_finite import INF, NAN, assert_like_reference
from test_attention_implementations import random_inputs
from test_block_sparse_cpu import uses_kernel

from transformer import patterns
from transformer.attention import block_sparse_attention, chunked_attention, dot_product_attention
from transformer.attention.auto import auto_implementation, choose_implementation
from transformer.attention.block_sparse import cpu_kernel
from transformer.attention.dot_product import SOFT_CAP_AND_SINKS
from transformer.modules.layers import LayerConfig
from transformer.modules.models import build_model
from transformer.modules.multihead_attention import MultiHeadAttention

CAP = 1.5  # small enough that the cap bends logits of random unit inputs (|s| up to ~5)


def reference(q, k, v, d_out, allowed, scale, *, slopes=None, cap=None, sinks=None):
    """float64 attention with a soft cap and sinks, and its gradients for the cotangent d_out.

    q: [b, q_len, h, d]; allowed: bool [b, q_len, kv_len]. In order: s = q.k * scale, the cap
    c * tanh(s / c), minus ALiBi, the mask, the softmax over allowed keys and the sink (a row
    with no allowed key gives zeros). Returns out, (dq, dk, dv, d_sinks).
    """
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    raw = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    cap_slope = 1.0
    scores = raw
    if cap is not None:
        t = np.tanh(raw / cap)
        scores, cap_slope = cap * t, 1.0 - t * t
    if slopes is not None:
        distance = np.abs(np.arange(q.shape[1])[:, None] - np.arange(k.shape[1])[None, :])
        scores = scores - np.asarray(slopes, np.float64)[None, :, None, None] * distance
    allowed = allowed[:, None]
    scores = np.where(allowed, scores, -np.inf)
    row_max = scores.max(-1, keepdims=True)
    has_key = row_max > -np.inf
    sink = None if sinks is None else np.asarray(sinks, np.float64)[None, :, None, None]
    shift = row_max if sink is None else np.maximum(row_max, sink)
    shift = np.where(has_key, shift, 0.0)
    weights = np.where(allowed, np.exp(scores - shift), 0.0)
    total = weights.sum(-1, keepdims=True)
    if sink is not None:
        total = total + np.where(has_key, np.exp(sink - shift), 0.0)
    total = np.where(has_key, total, 1.0)
    probs = weights / total
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    dv = np.einsum("bhqk,bqhd->bkhd", probs, d_out)
    d_probs = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    delta = np.einsum("bqhd,bqhd->bhq", d_out, out)[..., None]
    d_raw = probs * (d_probs - delta) * cap_slope
    dq = np.einsum("bhqk,bkhd->bqhd", d_raw, k) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", d_raw, q) * scale
    d_sinks = None
    if sink is not None:
        p_sink = np.where(has_key, np.exp(sink - shift) / total, 0.0)
        d_sinks = -(p_sink * delta).sum(axis=(0, 2, 3))
    return out, (dq, dk, dv, d_sinks)


def allowed_pairs(pattern, q_len, kv_len, key_valid, batch):
    allowed = np.broadcast_to(pattern.mask(q_len, kv_len), (batch, q_len, kv_len))
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed


def random_sinks(seed, heads):
    # Around the logits' size, so that the sink takes a real share of some rows and not others.
    return np.random.default_rng(seed).uniform(-1.0, 2.0, heads).astype(np.float32)


def with_gradients(attend):
    """jit((q, k, v, sinks, key_valid, d_out) -> (out, dq, dk, dv, d sinks)) of
    attend(q, k, v, sinks, key_valid)."""

    def run(q, k, v, sinks, key_valid, d_out):
        out, vjp = jax.vjp(lambda q, k, v, sinks: attend(q, k, v, sinks, key_valid), q, k, v, sinks)
        return (out, *vjp(d_out))

    return jax.jit(run)


def check(attend, pattern, inputs, *, cap, sinks, label, atol=2e-5, rtol=2e-4, run=None):
    """attend(q, k, v, sinks, key_valid) (or `run`, its `with_gradients`) against the float64
    reference, forward and gradients."""
    q, k, v, d_out, key_valid, slopes = inputs
    run = run or with_gradients(attend)
    out, *grads = run(q, k, v, sinks, key_valid, d_out)
    allowed = allowed_pairs(pattern, q.shape[1], k.shape[1], key_valid, q.shape[0])
    want_out, want_grads = reference(
        q, k, v, d_out, allowed, q.shape[-1] ** -0.5, slopes=slopes, cap=cap, sinks=sinks
    )
    for name, got, want in zip(
        ("out", "dq", "dk", "dv", "d_sinks"), (out, *grads), (want_out, *want_grads)
    ):
        if want is None:
            assert got is None, f"{label}: {name} should be None"
            continue
        got = np.asarray(got)
        assert np.isfinite(got).all(), f"{label}: NaN/inf in {name}"
        # d sinks sums over every row: allow for the sum's rounding.
        scale = 10.0 if name == "d_sinks" else 1.0
        np.testing.assert_allclose(
            got, want, atol=atol * scale, rtol=rtol, err_msg=f"{label} {name} {pattern}"
        )
    keyless = ~allowed.any(-1)
    assert keyless.any() or key_valid is None, "the padded inputs must have keyless rows"
    assert not np.asarray(out)[keyless].any(), f"{label}: keyless rows must give zeros"
    assert not np.asarray(grads[0])[keyless].any(), f"{label}: keyless rows' dq must be 0"


# One of each family; every implementation that takes a pattern is checked on each.
PATTERNS = {
    "full": patterns.full(),
    "causal": patterns.causal(),
    "sliding_window": patterns.sliding_window(5, 2),
    "anchor": patterns.anchor(3),
    "random": patterns.random(2, 4, seed=3),
    "bigbird": patterns.bigbird(block_size=4, seed=1) & patterns.causal(),
    "prefix_lm": patterns.prefix_lm(10),
    "predicate": patterns.predicate(lambda i, j: (i + 2 * j) % 5 < 2, "(i + 2j) % 5 < 2"),
}


def test_the_reference_gradients_are_its_derivatives():
    """The float64 reference's hand-written gradients, d sinks included, against central finite
    differences of its own output, with a cap, sinks, ALiBi and a keyless row."""
    q, k, v, d_out, _, _ = random_inputs(0, 1, 3, 4, 2, head_dim=3)
    allowed = np.ones((1, 3, 4), bool)
    allowed[0, 1] = False  # a keyless row
    allowed[0, 2, 3] = False
    options = dict(slopes=np.array([0.3, 0.1]), cap=CAP, sinks=random_sinks(1, 2))
    _, grads = reference(q, k, v, d_out, allowed, 0.7, **options)
    arrays = {"q": q, "k": k, "v": v, "sinks": options["sinks"]}

    def loss(name, array):
        values = {**arrays, name: array}
        changed = {**options, "sinks": values["sinks"]}
        out, _ = reference(values["q"], values["k"], values["v"], d_out, allowed, 0.7, **changed)
        return float((out * d_out).sum())

    step = 1e-6
    for (name, array), grad in zip(arrays.items(), grads):
        array = np.asarray(array, np.float64)
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            up, down = array.copy(), array.copy()
            up[index] += step
            down[index] -= step
            numeric[index] = (loss(name, up) - loss(name, down)) / (2 * step)
        np.testing.assert_allclose(grad, numeric, atol=1e-7, rtol=1e-6, err_msg=name)
    assert grads[3].shape == (2,) and np.abs(grads[3]).min() > 1e-3  # the sinks do learn


def via_entry_point(implementation, pattern, cap, **options):
    def attend(q, k, v, sinks, key_valid):
        mask = None if key_valid is None else key_valid[:, None, None, :]
        return dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            pattern=pattern,
            implementation=implementation,
            logit_soft_cap=cap,
            sinks=sinks,
            **options,
        )

    return attend


def via_block_sparse(pattern, cap, *, use_kernel, block, slopes=None):
    def attend(q, k, v, sinks, key_valid):
        return block_sparse_attention(
            q,
            k,
            v,
            pattern=pattern,
            key_valid=key_valid,
            alibi_slopes=slopes,
            logit_soft_cap=cap,
            sinks=sinks,
            block_q=block,
            block_kv=block,
            use_kernel=use_kernel,
        )

    return attend


def test_dense_matches_the_reference_in_every_pattern_family():
    """The dense reference's autodiff (d sinks included) against the float64 reference, with
    ALiBi, padding and a fully padded sequence, on odd lengths. The pattern is a mask to it:
    one compiled function serves them all."""
    inputs = random_inputs(11, 2, 37, 45, 2, head_dim=8, padding=True, alibi=True)
    sinks = random_sinks(2, 2)
    q, k, _, _, key_valid, slopes = inputs

    def attend(q, k, v, sinks, allowed):
        return dot_product_attention(
            q, k, v, mask=allowed, alibi_slopes=slopes, logit_soft_cap=CAP, sinks=sinks
        )

    run = with_gradients(attend)
    for pattern in PATTERNS.values():
        allowed = allowed_pairs(pattern, q.shape[1], k.shape[1], key_valid, q.shape[0])
        # The pattern as the mask argument; check() adds the padding to its own reference.
        dense = lambda q, k, v, sinks, _, d_out, allowed=allowed: run(
            q, k, v, sinks, jnp.asarray(allowed)[:, None], d_out
        )
        check(None, pattern, inputs, cap=CAP, sinks=sinks, label="dense", run=dense)
    # And through the entry point's own pattern argument.
    pattern = PATTERNS["bigbird"]
    attend = via_entry_point("dense", pattern, CAP, alibi_slopes=slopes)
    check(attend, pattern, inputs, cap=CAP, sinks=sinks, label="dense")


@pytest.mark.parametrize("name", list(PATTERNS))
def test_block_sparse_kernel_matches_the_reference(name):
    """The fused CPU kernel (forward, backward; sinks added around it), blocks of 16 so rows
    span several blocks and the chunk of 8 blocks, odd lengths, padding."""
    assert cpu_kernel.unavailable() is None
    pattern = PATTERNS[name]
    inputs = random_inputs(12, 2, 151, 145, 2, head_dim=16, padding=True)
    sinks = random_sinks(3, 2)
    attend = via_block_sparse(pattern, CAP, use_kernel=True, block=16)
    q, k, v = inputs[:3]
    valid = jnp.asarray(inputs[4])
    loss = lambda q, k, v: attend(q, k, v, jnp.asarray(sinks), valid).sum()
    assert uses_kernel(jax.grad(loss, (0, 1, 2)), q, k, v) == (True, True)
    check(attend, pattern, inputs, cap=CAP, sinks=sinks, label="kernel")


@pytest.mark.parametrize("name", list(PATTERNS))
def test_block_sparse_xla_schedules_match_the_reference(name):
    """XLA's block-sparse schedules (whole rows, row pieces, and rows sent to chunked
    attention), with ALiBi, padding and odd lengths."""
    pattern = PATTERNS[name]
    inputs = random_inputs(13, 2, 29, 27, 2, head_dim=8, padding=True, alibi=True)
    sinks = random_sinks(4, 2)
    attend = via_block_sparse(pattern, CAP, use_kernel=False, block=8, slopes=inputs[5])
    check(attend, pattern, inputs, cap=CAP, sinks=sinks, label="xla schedules")


@pytest.mark.parametrize(
    "name, cap, with_sinks",
    [("causal", CAP, True), ("full", CAP, False)],
)
def test_chunked_matches_the_reference(name, cap, with_sinks):
    """Chunked attention (full and causal, the patterns it takes) in tiles of 16 queries by 8
    keys, so that causal rows cross masked and unmasked tiles, with ALiBi: the cap and the
    sinks together and each alone."""
    inputs = random_inputs(14, 2, 37, 37, 2, head_dim=8, padding=True, alibi=True)
    sinks = random_sinks(5, 2) if with_sinks else None

    def attend(q, k, v, sinks, key_valid):
        return chunked_attention(
            q,
            k,
            v,
            causal=name == "causal",
            key_valid=key_valid,
            alibi_slopes=inputs[5],
            logit_soft_cap=cap,
            sinks=sinks,
            chunk_size=(16, 8),
        )

    check(attend, PATTERNS[name], inputs, cap=cap, sinks=sinks, label="chunked")
    if name == "causal":  # the entry point passes both on
        entry = via_entry_point("chunked", PATTERNS[name], cap, alibi_slopes=inputs[5])
        check(entry, PATTERNS[name], inputs, cap=cap, sinks=sinks, label="chunked entry point")


@pytest.mark.parametrize("use_kernel, cap, with_sinks", [(True, None, True), (False, CAP, False)])
def test_each_alone_in_block_sparse(use_kernel, cap, with_sinks):
    """The kernel with only the sinks, the XLA schedules with only the cap."""
    inputs = random_inputs(15, 2, 70, 70, 2, head_dim=16, padding=True)
    sinks = random_sinks(6, 2) if with_sinks else None
    pattern = PATTERNS["bigbird"]
    attend = via_block_sparse(pattern, cap, use_kernel=use_kernel, block=16)
    check(attend, pattern, inputs, cap=cap, sinks=sinks, label=f"kernel={use_kernel}")


def test_auto_at_the_kernel_size_matches_the_reference():
    """ "auto" on CPU (block-sparse's kernel in 64-blocks here) through the entry point."""
    inputs = random_inputs(16, 2, 130, 130, 2, head_dim=16, padding=True)
    q, k, v = inputs[:3]
    sinks = random_sinks(7, 2)
    pattern = PATTERNS["causal"]
    assert auto_implementation(q, k, v, pattern=pattern, sinks=sinks, logit_soft_cap=CAP) == (
        "block_sparse"
    )
    check(
        via_entry_point("auto", pattern, CAP), pattern, inputs, cap=CAP, sinks=sinks, label="auto"
    )


def test_splash_interpreted_matches_the_reference():
    """Splash's own soft cap and sinks (its Pallas kernel in interpret mode)."""
    inputs = random_inputs(17, 2, 45, 45, 2, head_dim=8, padding=True)
    sinks = random_sinks(8, 2)
    pattern = PATTERNS["bigbird"]
    check(
        via_entry_point("splash", pattern, CAP),
        pattern,
        inputs,
        cap=CAP,
        sinks=sinks,
        label="splash",
    )


def test_a_sink_of_minus_infinity_is_no_sink_and_a_large_one_takes_all_weight():
    """Forward only; keyless rows (a fully padded sequence) stay zeros with a sink of -inf, in
    splash too, whose masked scores are finite."""
    inputs = random_inputs(18, 2, 40, 40, 2, head_dim=16, padding=True)
    q, k, v, _, key_valid, _ = inputs
    mask = jnp.asarray(key_valid)[:, None, None, :]
    for implementation, pattern in (
        ("dense", patterns.sliding_window(6)),
        ("block_sparse", patterns.sliding_window(6)),
        ("chunked", patterns.causal()),
        ("splash", patterns.sliding_window(6)),
    ):
        attend = jax.jit(
            lambda sinks, implementation=implementation, pattern=pattern: dot_product_attention(
                q, k, v, mask=mask, pattern=pattern, implementation=implementation, sinks=sinks
            )
        )
        none = jax.jit(
            lambda implementation=implementation, pattern=pattern: dot_product_attention(
                q, k, v, mask=mask, pattern=pattern, implementation=implementation
            )
        )()
        np.testing.assert_allclose(attend(jnp.full((2,), -jnp.inf)), none, atol=1e-6)
        large = attend(jnp.full((2,), 200.0))
        assert np.abs(np.asarray(large)).max() < 1e-30, implementation


NON_FINITE_PATTERNS = {"causal": patterns.causal()}
# (pattern, poisoned entries (array, index, value)) on [2, 48, 2, 16] inputs; batch 1 pads its
# last 8 keys. Under causal(), a value at position 30 is excluded from rows 0-29 (some in the
# same 16-block) and allowed in the rest.
NON_FINITE = {
    "nan key, padded": ("causal", [("k", (1, slice(42, None)), NAN)]),
    "nan value, excluded from earlier rows": ("causal", [("v", (0, 30), NAN)]),
    "nan query, allowed": ("causal", [("q", (0, 10), NAN)]),
    # q.k = +-inf: the cap makes it +-c, a finite logit, so those rows stay finite.
    "inf query": ("causal", [("q", (0, 7, 0, 0), INF)]),
    "inf value": ("causal", [("v", (0, 20, 1, 2), INF)]),
}
NON_FINITE_KEY_VALID = np.ones((2, 48), bool)
NON_FINITE_KEY_VALID[1, 40:] = False


@functools.cache
def non_finite_run(implementation, pattern_name):
    """jit((q, k, v, sinks, d_out) -> (out, dq, dk, dv, d sinks)) with the cap, compiled once
    per implementation and pattern: "dense" (the reference), "block_sparse" (the kernel, one
    64-block), "block_sparse_xla" (XLA's schedules in 16-blocks), "chunked" or "splash"."""
    pattern = NON_FINITE_PATTERNS[pattern_name]
    key_valid = jnp.asarray(NON_FINITE_KEY_VALID)
    if implementation == "block_sparse_xla":
        attend = functools.partial(
            block_sparse_attention, block_q=16, use_kernel=False, key_valid=key_valid
        )
    else:
        attend = functools.partial(
            dot_product_attention, mask=key_valid[:, None, None, :], implementation=implementation
        )

    def run(q, k, v, sinks, d_out):
        out, vjp = jax.vjp(
            lambda q, k, v, sinks: attend(
                q, k, v, pattern=pattern, logit_soft_cap=CAP, sinks=sinks
            ),
            q,
            k,
            v,
            sinks,
        )
        return (out, *vjp(d_out))

    return jax.jit(run)


@pytest.mark.xdist_group("test_soft_cap_and_sinks non_finite_run")  # one worker: compiled once
@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_inputs_as_the_dense_reference(case):
    """NaN and inf with a cap and sinks: where NaN and +-inf land and the finite values, in
    output and gradients (d sinks too), equal the dense reference's."""
    pattern_name, where = NON_FINITE[case]
    rng = np.random.default_rng(19)
    arrays = {name: rng.standard_normal((2, 48, 2, 16)).astype(np.float32) for name in "qkvd"}
    for name, index, value in where:
        arrays[name][index] = value
    inputs = (arrays["q"], arrays["k"], arrays["v"], random_sinks(9, 2), arrays["d"])
    want = non_finite_run("dense", pattern_name)(*inputs)
    for label in ("block_sparse", "block_sparse_xla", "chunked", "splash"):
        got = non_finite_run(label, pattern_name)(*inputs)
        names = ("out", "dq", "dk", "dv", "d_sinks")
        assert_like_reference(got, want, names, f"{label} {case}", atol=1e-4, rtol=5e-4)
    if case == "inf query":
        assert np.isfinite(np.asarray(want[0])).all()  # the cap keeps the rows finite
    if case == "nan query, allowed":
        assert np.isnan(np.asarray(want[4])).all()  # a NaN row reaches d sinks


def test_bad_values_are_refused_with_clear_errors():
    x = jnp.ones((1, 8, 2, 4))
    for bad in (0.0, -1.0, float("nan"), float("inf"), "50", True, jnp.float32(50.0), [50.0]):
        with pytest.raises(ValueError, match="logit_soft_cap must be None or a finite number > 0"):
            dot_product_attention(x, x, x, logit_soft_cap=bad)
    np.testing.assert_allclose(  # ints and NumPy floats are numbers
        dot_product_attention(x, x, x, logit_soft_cap=2),
        dot_product_attention(x, x, x, logit_soft_cap=np.float64(2.0)),
    )
    with pytest.raises(ValueError, match=r"sinks must have shape \[heads\] = \(2,\)"):
        dot_product_attention(x, x, x, sinks=jnp.zeros(3))
    with pytest.raises(TypeError, match="sinks must have a floating dtype"):
        dot_product_attention(x, x, x, sinks=jnp.zeros(2, jnp.int32))
    with pytest.raises(TypeError, match="sinks must be a jax or NumPy array"):
        dot_product_attention(x, x, x, sinks=[0.0, 0.0])
    for implementation in ("xla", "cudnn", "lra_local"):
        for option in ({"logit_soft_cap": 5.0}, {"sinks": jnp.zeros(2)}):
            name = next(iter(option))
            with pytest.raises(ValueError, match=f"{name} is computed by implementations"):
                dot_product_attention(x, x, x, implementation=implementation, **option)
    assert set(SOFT_CAP_AND_SINKS) == {"dense", "chunked", "block_sparse", "splash", "auto"}
    # Called directly, the jax.nn wrappers say why.
    from transformer.attention import xla_attention

    with pytest.raises(ValueError, match="'xla' takes no sinks.*jax.nn.dot_product_attention"):
        xla_attention(x, x, x, pattern=patterns.full(), sinks=jnp.zeros(2))


def test_auto_on_gpu_picks_cudnn_where_it_applies():
    """The GPU rule as a pure function (no GPU here): cuDNN for half precision, full, causal or
    a window ending at the query, head dims it takes, no sinks, soft cap or ALiBi; block-sparse
    otherwise; dense for tiny score matrices."""
    rule = functools.partial(
        choose_implementation, backend="gpu", dtype=jnp.bfloat16, head_dim=64, value_dim=64
    )
    causal, window = patterns.causal(), patterns.sliding_window(128, 0)
    assert rule(causal, 1024, 1024) == "cudnn"
    assert rule(patterns.full(), 1024, 512) == "cudnn"
    assert rule(window, 4096, 4096) == "cudnn"
    assert rule(patterns.sliding_window(128) & causal, 4096, 4096) == "cudnn"
    assert rule(causal, 1024, 1024, dtype=jnp.float16) == "cudnn"
    assert rule(causal, 1024, 1024, key_padding=True) == "cudnn"
    for changed in (
        dict(dtype=jnp.float32),
        dict(dtype=None),
        dict(sinks=True),
        dict(logit_soft_cap=True),
        dict(alibi=True),
        dict(head_dim=60, value_dim=60),
        dict(head_dim=256, value_dim=256),
        dict(value_dim=128),
    ):
        assert rule(causal, 1024, 1024, **changed) == "block_sparse", changed
    assert rule(patterns.sliding_window(128), 4096, 4096) == "block_sparse"  # right of the query
    assert rule(patterns.bigbird(), 4096, 4096) == "block_sparse"
    assert rule(causal, 1024, 512) == "block_sparse"  # unequal lengths under a mask
    assert rule(causal, 1023, 1023, key_padding=True) == "block_sparse"  # odd, with padding
    assert rule(causal, 1023, 1023) == "cudnn"
    assert rule(causal, 1, 512) == "dense"  # a decoding step
    # auto_implementation reads the same facts off the arrays.
    q = jax.ShapeDtypeStruct((2, 1024, 8, 64), jnp.bfloat16)
    assert auto_implementation(q, q, q, pattern=causal, backend="gpu") == "cudnn"
    assert auto_implementation(q, q, q, pattern=causal, backend="gpu", sinks=jnp.zeros(8)) == (
        "block_sparse"
    )
    assert (
        auto_implementation(q, q, q, pattern=causal, backend="gpu", logit_soft_cap=50.0)
        == "block_sparse"
    )
    # TPU: splash takes the cap and the sinks, not ALiBi.
    assert choose_implementation(causal, 4096, 4096, "tpu", sinks=True, logit_soft_cap=True) == (
        "splash"
    )
    assert choose_implementation(causal, 4096, 4096, "tpu", alibi=True) == "block_sparse"


def test_layer_config_fields_are_checked_and_the_sinks_learn():
    """LayerConfig's logit_soft_cap and attention_sinks: checked at construction, passed to
    every attention layer; each layer gets a "sinks" parameter of zeros `[heads]`, which
    training moves (its gradient is not zero)."""
    assert LayerConfig(logit_soft_cap=50).logit_soft_cap == 50.0
    for fields, message in (
        (dict(logit_soft_cap=0.0), "logit_soft_cap must be None or a finite number > 0"),
        (dict(logit_soft_cap="50"), "logit_soft_cap must be None or a finite number > 0"),
        (dict(attention_sinks=1), "attention_sinks must be True or False; got 1"),
        (
            dict(attention_sinks=True, implementation="xla"),
            r"attention_sinks are computed by implementations .* got implementation='xla'",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            LayerConfig(**fields)
    with pytest.raises(ValueError, match="attention_sinks must be True or False"):
        MultiHeadAttention(num_heads=2, features=8, attention_sinks="yes").init(
            jax.random.key(0), jnp.ones((1, 3, 8))
        )
    model = build_model(
        dict(
            name="decoder_lm",
            vocab_size=29,
            d_model=16,
            num_heads=2,
            d_ff=32,
            num_layers=1,
            logit_soft_cap=5.0,
            attention_sinks=True,
        )
    )
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 1, 29)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    flat = flax.traverse_util.flatten_dict(variables["params"])
    sinks = {path: leaf for path, leaf in flat.items() if path[-1] == "sinks"}
    assert len(sinks) == 1 and all(leaf.shape == (2,) and not leaf.any() for leaf in sinks.values())

    def loss(params):
        logits = model.apply({"params": params}, tokens)
        return -jax.nn.log_softmax(logits)[..., 3].mean()

    grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(variables["params"]))
    assert all(np.abs(grads[path]).min() > 0 for path in sinks)


def test_sinks_learn_under_shard_map():
    """Data parallel, as the training loop runs: q, k, v split over the 8 devices, the sinks
    (a parameter) replicated; their gradient, summed over the devices, equals the unsplit
    one, in the kernel and XLA's schedules. (Chunked attention's sinks enter its custom VJP as
    its ALiBi slopes do, which tests/test_chunked.py differentiates under shard_map.)"""
    devices = jax.devices()
    q, k, v, d_out, key_valid, _ = random_inputs(20, len(devices), 40, 40, 2, head_dim=16)
    sinks = jnp.asarray(random_sinks(10, 2))
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    data, replicated = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
    attends = {
        "kernel": via_block_sparse(PATTERNS["bigbird"], CAP, use_kernel=True, block=16),
        "xla": via_block_sparse(PATTERNS["bigbird"], CAP, use_kernel=False, block=16),
    }
    for name, attend in attends.items():

        def grads(q, k, v, sinks, d_out, attend=attend):
            loss = lambda q, k, v, sinks: (attend(q, k, v, sinks, None) * d_out).sum()
            return jax.grad(loss, (0, 1, 2, 3))(q, k, v, sinks)

        # The sinks enter replicated: their gradient comes out summed over the devices.
        split = jax.jit(
            jax.shard_map(
                grads,
                mesh=mesh,
                in_specs=(data, data, data, replicated, data),
                out_specs=(data, data, data, replicated),
            )
        )
        for got, want in zip(split(q, k, v, sinks, d_out), jax.jit(grads)(q, k, v, sinks, d_out)):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4, err_msg=name)
