"""NaN and inf in queries, keys and values: every implementation as the dense reference.

The rule (docs/attention.md): what a mask excludes (the pattern, key padding, and the query of a
row with no allowed key) never reaches the output or the gradients; what it allows propagates as
IEEE arithmetic over the allowed pairs does, so NaN in gives NaN out. Each case poisons some
positions, runs every implementation forward and backward (with a finite output cotangent), and
compares where NaN and +-inf land and the finite values with the dense reference; poison only in
excluded positions must leave every result as the clean inputs give it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from non_finite import INF, NAN, assert_like_reference

from transformer import patterns
from transformer.attention import dot_product_attention
from transformer.attention.block_sparse import block_sparse_attention, cpu_kernel

# One worker process runs these tests, so each implementation and pattern compiles once (_run).
pytestmark = pytest.mark.xdist_group("test_nan_semantics")

BATCH, LENGTH, HEADS, DIM = 2, 64, 2, 16
# Batch 0 pads its last keys; batch 1 its first, so under causal() its first rows see no key.
KEY_VALID = np.ones((BATCH, LENGTH), bool)
KEY_VALID[0, 56:] = False
KEY_VALID[1, :4] = False
RESULTS = ("out", "dq", "dk", "dv")


# XLA:CPU's default fusion emitters, which conftest.py swaps for the older, faster-compiling ones.
USERS_CPU_COMPILER = {"xla_cpu_use_fusion_emitters": True}


@pytest.fixture(autouse=True, scope="module")
def _optimised_compilation():
    """Where NaN and inf land can depend on how XLA rewrites the arithmetic, so these tests
    compile with XLA's optimisation passes on and its default emitters (USERS_CPU_COMPILER), as
    users run, which conftest.py changes for the rest of the suite."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def _implementations():
    def via_entry_point(name):
        return lambda q, k, v, pattern, mask: dot_product_attention(
            q, k, v, mask=mask, pattern=pattern, implementation=name
        )

    def block_sparse(use_kernel):
        return lambda q, k, v, pattern, mask: block_sparse_attention(
            q,
            k,
            v,
            pattern=pattern,
            key_valid=mask[:, 0, 0],
            block_q=16,
            use_kernel=use_kernel,
        )

    return {
        "chunked": via_entry_point("chunked"),
        "block_sparse": via_entry_point("block_sparse"),  # one 64-block: the kernel
        "block_sparse_kernel_16": block_sparse(True),
        "block_sparse_xla_16": block_sparse(False),
        "xla": via_entry_point("xla"),
        "splash": via_entry_point("splash"),  # the Pallas kernel, interpreted on CPU
        "auto": via_entry_point("auto"),
    }


IMPLEMENTATIONS = _implementations()
PATTERNS = {
    "causal": patterns.causal(),
    "full": patterns.full(),
    "window": patterns.sliding_window(5),
}


@functools.cache
def _run(name, pattern_name):
    """jit(inputs -> (out, dq, dk, dv)) for one implementation and pattern, compiled once."""
    attend = dense if name == "dense" else IMPLEMENTATIONS[name]
    pattern = PATTERNS[pattern_name]
    mask = jnp.asarray(KEY_VALID)[:, None, None, :]

    def run(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, pattern, mask), q, k, v)
        return (out, *vjp(d_out))

    return jax.jit(run, compiler_options=USERS_CPU_COMPILER)


def dense(q, k, v, pattern, mask):
    return dot_product_attention(q, k, v, mask=mask, pattern=pattern, implementation="dense")


def clean_inputs():
    rng = np.random.default_rng(0)
    q, k, v, d_out = (
        rng.standard_normal((BATCH, LENGTH, HEADS, DIM)).astype(np.float32) for _ in range(4)
    )
    return q, k, v, d_out


def poisoned(where):
    """Clean inputs with `where`'s entries (array, index, value) written in."""
    arrays = dict(zip("qkv", clean_inputs()[:3]))
    for name, index, value in where:
        arrays[name][index] = value
    return arrays["q"], arrays["k"], arrays["v"], clean_inputs()[3]


# (name, pattern, poisoned entries); a key or value index is [batch, position, head, dim].
CASES = {
    # The reported reproducer: NaN keys that padding excludes (batch 0) or allows (batch 1).
    "nan_keys_padded": ("causal", [("k", (slice(None), slice(60, None)), NAN)]),
    "nan_values_padded": ("causal", [("v", (slice(None), slice(60, None)), NAN)]),
    # A NaN an earlier row excludes by the pattern, in the same 16-block as rows that allow it.
    "nan_key_in_block": ("causal", [("k", (slice(None), 20), NAN)]),
    "nan_value_in_block": ("causal", [("v", (slice(None), 20, 0, 3), NAN)]),
    "inf_value_in_block": ("causal", [("v", (slice(None), 20, 1, 5), INF)]),
    "neg_inf_value_in_window": ("window", [("v", (slice(None), 30, 0, 0), -INF)]),
    "nan_value_in_window": ("window", [("v", (slice(None), 33), NAN)]),
    # A NaN query that is allowed gives NaN, never zeros; one of a keyless row gives zeros.
    "nan_query_allowed": ("causal", [("q", (0, 10), NAN)]),
    "nan_query_keyless": ("causal", [("q", (1, 2), NAN)]),
    "inf_query": ("full", [("q", (0, 7, 0, 0), INF)]),
    "neg_inf_key": ("full", [("k", (1, 40, 1, 2), -INF)]),
    "inf_key_padded": ("full", [("k", (0, 58, 0, 1), INF)]),
}


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_non_finite_inputs_match_the_dense_reference(name):
    if name.startswith("block_sparse_kernel") or name in ("block_sparse", "auto"):
        assert cpu_kernel.unavailable() is None  # these cases must exercise the kernel
    for label, (pattern_name, where) in CASES.items():
        if name == "chunked" and pattern_name == "window":
            continue  # chunked computes full and causal attention only
        inputs = poisoned(where)
        want = _run("dense", pattern_name)(*inputs)
        got = _run(name, pattern_name)(*inputs)
        assert_like_reference(got, want, RESULTS, f"{name} {label}", atol=5e-5, rtol=5e-4)


# Poison only where the mask excludes: keys and values of padded positions (batch 0's last
# keys), the queries of rows with no allowed key (batch 1's first rows under causal), and under a
# sliding window a key every row of another block excludes (row 20's window is keys 15..25).
EXCLUDED = {
    "causal": [
        ("k", (0, slice(56, None)), NAN),
        ("v", (0, slice(57, None)), NAN),
        ("v", (0, 56, 0, 0), INF),
        ("q", (1, slice(0, 4)), NAN),
        ("k", (1, slice(0, 2)), -INF),
        ("v", (1, 3), NAN),
    ],
    "window": [
        ("k", (0, slice(58, None)), NAN),
        ("v", (0, slice(56, None)), INF),
    ],
}


@pytest.mark.parametrize("name", ["dense", *sorted(IMPLEMENTATIONS)])
def test_excluded_non_finite_inputs_never_reach_the_results(name):
    for pattern_name, where in EXCLUDED.items():
        if name == "chunked" and pattern_name == "window":
            continue
        got = _run(name, pattern_name)(*poisoned(where))
        want = _run(name, pattern_name)(*clean_inputs())
        for label, g, w in zip(RESULTS, got, want):
            g, w = np.asarray(g), np.asarray(w)
            if label != "out":  # gradients of the poisoned (excluded) inputs are zero
                for array, index, _ in where:
                    if "d" + array == label:
                        w = w.copy()
                        w[index] = 0.0
            assert np.isfinite(g).all(), f"{name} {pattern_name} {label}"
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4, err_msg=f"{name} {label}")


def test_keyless_rows_give_zeros():
    q, k, v, d_out = poisoned([("q", (1, slice(0, 4)), NAN)])
    for name in ["dense", *sorted(IMPLEMENTATIONS)]:
        out, dq, _, _ = _run(name, "causal")(q, k, v, d_out)
        assert not np.asarray(out)[1, :4].any() and not np.asarray(dq)[1, :4].any(), name
