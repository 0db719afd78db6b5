"""The fused CPU kernel of block-sparse attention against the float64 reference, and its fallback.

The kernel takes key blocks and head dims that are multiples of 16 (the other block-sparse tests
use head dim 8, so they exercise XLA's schedules). The test command installs g++, so a missing
kernel fails here rather than skipping.
"""

import hashlib
import stat
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_implementations import (
    composed_patterns,
    forward_and_gradients,
    random_inputs,
    reference,
)

from transformer import patterns
from transformer.attention import block_sparse
from transformer.attention.block_sparse import cpu_kernel
from transformer.attention.dense import dense_attention


def calls_kernel(lowered):
    """Whether a lowered program calls the kernel's forward and backward."""
    text = lowered.as_text()
    return cpu_kernel._FORWARD in text, cpu_kernel._BACKWARD in text


def uses_kernel(fn, *args):
    """Whether `fn` compiled for `args` calls the kernel's forward and backward."""
    return calls_kernel(jax.jit(fn).lower(*args))


def check(pattern, inputs, block_q, block_kv, use_kernel=True):
    q, k, v, d_out, key_valid, _ = inputs

    def attend(q, k, v):
        return block_sparse.block_sparse_attention(
            q,
            k,
            v,
            pattern=pattern,
            key_valid=None if key_valid is None else jnp.asarray(key_valid),
            block_q=block_q,
            block_kv=block_kv,
            use_kernel=use_kernel,
        )

    lowered = forward_and_gradients(attend).lower(d_out, q, k, v)
    called = calls_kernel(lowered)
    out, *grads = lowered.compile()(d_out, q, k, v)
    q_len, kv_len = q.shape[1], k.shape[1]
    allowed = np.broadcast_to(pattern.mask(q_len, kv_len), (q.shape[0], q_len, kv_len))
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    expected, expected_grads = reference(q, k, v, d_out, allowed, q.shape[-1] ** -0.5, None)
    got = (out,) + tuple(grads)
    for name, g, want in zip(("out", "dq", "dk", "dv"), got, (expected,) + expected_grads):
        np.testing.assert_allclose(
            np.asarray(g), want, atol=2e-5, rtol=2e-4, err_msg=f"{name} {pattern}"
        )
    keyless = ~allowed.any(-1)
    assert not np.asarray(out)[keyless].any() and not np.asarray(got[1])[keyless].any()
    return called


def test_kernel_is_built():
    assert cpu_kernel.unavailable() is None


@settings(max_examples=30, deadline=None)
@given(
    pattern=composed_patterns(),
    q_len=st.integers(1, 150),
    kv_len=st.integers(1, 150),
    block_q=st.integers(1, 40),
    block_kv=st.sampled_from([16, 32]),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 32]),
    padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(
    pattern, q_len, kv_len, block_q, block_kv, heads, head_dim, padding, seed
):
    """Odd lengths, any query block, padding (a whole padded sequence: keyless rows), and rows
    longer than the kernel's chunk of 8 key blocks (up to 10 blocks of 16 here)."""
    inputs = random_inputs(seed, 2, q_len, kv_len, heads, head_dim=head_dim, padding=padding)
    plan = block_sparse.make_plan(pattern, q_len, kv_len, block_q, block_kv, dense_rows_apart=False)
    has_blocks = len(plan.row_blocks[0]) > 0  # else there is nothing to compute: all zeros
    assert check(pattern, inputs, block_q, block_kv) == (has_blocks, has_blocks)


def test_dense_rows_across_chunks_and_value_dim():
    """Anchor rows see all 40 key blocks (5 chunks of 8, online softmax between chunks); values
    wider than keys."""
    q, k, v, d_out, key_valid, _ = random_inputs(5, 2, 640, 640, 2, head_dim=16, padding=True)
    v = np.concatenate([v, v[..., ::-1]], -1)
    d_out = np.concatenate([d_out, d_out], -1)
    pattern = patterns.bigbird(block_size=16, seed=1)
    assert check(pattern, (q, k, v, d_out, key_valid, None), 16, 16) == (True, True)


@pytest.mark.parametrize(
    "head_dim, block_kv, value_dim", [(64, 64, 64), (128, 64, 80), (48, 48, 128)]
)
def test_model_sizes(head_dim, block_kv, value_dim):
    """Head dims and blocks of real models: register tiles of 3 and 4 vectors, a second column
    tile (128, 80), forward and gradients."""
    q, k, _, _, key_valid, _ = random_inputs(6, 2, 301, 301, 2, head_dim=head_dim, padding=True)
    rng = np.random.default_rng(7)
    v, d_out = (rng.normal(size=(2, 301, 2, value_dim)).astype(np.float32) for _ in range(2))
    pattern = patterns.bigbird(block_size=block_kv, seed=3)
    assert check(pattern, (q, k, v, d_out, key_valid, None), 64, block_kv) == (True, True)
    assert check(patterns.causal(), (q, k, v, d_out, key_valid, None), 64, block_kv) == (True, True)


def test_large_logits():
    """Logits in the hundreds: most exponentials underflow to exactly 0, and a later chunk's
    larger maximum rescales earlier ones to 0."""
    q, k, v, d_out, key_valid, _ = random_inputs(8, 1, 400, 400, 2, head_dim=16, padding=True)
    assert check(patterns.full(), (q * 30, k, v, d_out, key_valid, None), 32, 16) == (True, True)


def test_bfloat16_and_unsupported_sizes():
    q, k, v = random_inputs(11, 1, 130, 130, 2, head_dim=16)[:3]
    attend = lambda dtype, **options: block_sparse.block_sparse_attention(
        *(jnp.asarray(x, dtype) for x in (q, k, v)),
        pattern=patterns.sliding_window(20),
        block_q=16,
        **options,
    )
    # bfloat16 inputs are computed in float32 by the kernel, and returned as bfloat16.
    assert cpu_kernel._FORWARD in jax.jit(lambda: attend(jnp.bfloat16)).lower().as_text()
    low = attend(jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), attend(jnp.float32), atol=0.05)
    # A key block of 12 is not a multiple of 16: XLA's schedules, with the same results.
    inputs = random_inputs(12, 2, 70, 70, 2, head_dim=16, padding=True)
    assert check(patterns.bigbird(block_size=12), inputs, 12, 12) == (False, False)


def test_key_valid_shapes():
    q, k, v, _, key_valid, _ = random_inputs(13, 2, 50, 50, 2, head_dim=16, padding=True)
    attend = lambda key_valid: block_sparse.block_sparse_attention(
        q, k, v, pattern=patterns.full(), key_valid=key_valid, block_q=16
    )
    # One row of padding for the whole batch is broadcast, as in dot_product_attention.
    np.testing.assert_allclose(
        attend(key_valid[:1]), attend(np.broadcast_to(key_valid[:1], key_valid.shape))
    )
    with pytest.raises(ValueError, match=r"key_valid must be \[batch, kv_len\] = \[2, 50\]"):
        attend(np.concatenate([key_valid, key_valid]))
    with pytest.raises(ValueError, match="got shape"):
        attend(key_valid[:, :40])


def test_kernel_matches_xla_schedules_on_bigbird():
    inputs = random_inputs(9, 1, 1000, 1000, 4, head_dim=64)
    q, k, v = inputs[:3]
    outputs = [
        block_sparse.block_sparse_attention(
            q, k, v, pattern=patterns.bigbird(), use_kernel=use_kernel
        )
        for use_kernel in (True, False)
    ]
    np.testing.assert_allclose(*outputs, atol=1e-5, rtol=1e-4)
    assert check(patterns.bigbird(), inputs, 64, 64, use_kernel=False) == (False, False)


def test_kernel_under_vmap_shard_map_and_pmap():
    devices = jax.devices()
    pattern = patterns.bigbird(block_size=16, seed=2) & patterns.causal()
    q, k, v, d_out, key_valid, _ = random_inputs(
        3, len(devices), 70, 70, 2, head_dim=16, padding=True
    )

    def grads(q, k, v, key_valid):
        loss = lambda q, k, v: (
            block_sparse.block_sparse_attention(
                q, k, v, pattern=pattern, key_valid=key_valid, block_q=16
            )
            * d_out[:1]
        ).sum()
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    allowed = pattern.mask(70, 70)[None] & key_valid[:, None, :]
    expected = reference(q, k, v, np.broadcast_to(d_out[:1], q.shape), allowed, 16**-0.5, None)[1]
    split = lambda x: x.reshape(len(devices), 1, *x.shape[1:])
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    spec = jax.sharding.PartitionSpec("data")
    transformed = {
        "vmap": (jax.jit(jax.vmap(grads)), [split(x) for x in (q, k, v, key_valid)]),
        "shard_map": (
            jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=spec, out_specs=spec)),
            [q, k, v, key_valid],
        ),
        "pmap": (jax.pmap(grads), [split(x) for x in (q, k, v, key_valid)]),
    }
    for name, (fn, args) in transformed.items():
        text = fn.lower(*args).as_text()
        assert cpu_kernel._FORWARD in text and cpu_kernel._BACKWARD in text, name
        for got, want in zip(fn(*args), expected):
            np.testing.assert_allclose(
                np.asarray(got).reshape(want.shape), want, atol=2e-5, rtol=2e-4, err_msg=name
            )


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """Forget the loaded kernel for one test, and restore it after."""
    cpu_kernel._load.cache_clear()
    cpu_kernel.unavailable.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_kernel._load.cache_clear()
    cpu_kernel.unavailable.cache_clear()
    assert cpu_kernel.unavailable() is None


def test_without_a_compiler_block_sparse_warns_and_uses_xla(fresh_kernel_state, tmp_path):
    fresh_kernel_state.setenv("CXX", str(tmp_path / "no-such-compiler"))
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = cpu_kernel.unavailable()
    assert "no C++ compiler" in reason and "apt-get install g++" in reason
    assert any("XLA schedules" in str(w.message) for w in caught)
    inputs = random_inputs(1, 2, 50, 50, 2, head_dim=16, padding=True)
    assert check(patterns.bigbird(block_size=16), inputs, 16, 16) == (False, False)


def test_a_failing_compile_names_the_error(fresh_kernel_state, tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'fatal: out of cheese' >&2\nexit 1\n")
    compiler.chmod(0o755)
    fresh_kernel_state.setenv("CXX", str(compiler))
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reason = cpu_kernel.unavailable()
    assert "compiling cpu_kernel.cc failed" in reason and "out of cheese" in reason
    assert not list((tmp_path / "cache").glob("*.so"))  # no partial library left to load


def test_builds_into_the_cache_once(fresh_kernel_state, tmp_path):
    cache = tmp_path / "new" / "cache"
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(cache))
    assert cpu_kernel.unavailable() is None
    built = list(cache.glob("block_sparse_cpu-*.so"))
    assert len(built) == 1
    # A private directory, and the library's digest recorded next to it.
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    recorded = (cache / (built[0].name + ".sha256")).read_text().strip()
    assert recorded == hashlib.sha256(built[0].read_bytes()).hexdigest()
    stamp = built[0].stat().st_mtime_ns
    cpu_kernel._load.cache_clear()
    cpu_kernel.unavailable.cache_clear()
    assert cpu_kernel.unavailable() is None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_disabled_by_environment(fresh_kernel_state):
    fresh_kernel_state.setenv("TRANSFORMER_CPU_KERNEL", "0")
    assert "TRANSFORMER_CPU_KERNEL=0" in cpu_kernel.unavailable()
    inputs = random_inputs(2, 1, 40, 40, 1, head_dim=16)
    assert check(patterns.sliding_window(5), inputs, 16, 16) == (False, False)


# A library with a constructor that leaves a marker file when it is loaded: what an attacker
# would plant in a cache directory they can write to.
PLANTED_SOURCE = r"""
#include <cstdio>
__attribute__((constructor)) static void planted() {
  if (FILE* f = std::fopen(MARKER, "w")) std::fclose(f);
}
"""


def plant_library(cache, marker, *, digest):
    """Compiles the planted library under the kernel's expected name in `cache`; `digest` is
    "right" (its SHA-256), "wrong" or None (no digest file)."""
    source = cache.parent / "planted.cc"
    source.write_text(PLANTED_SOURCE)
    library = cache / f"block_sparse_cpu-{cpu_kernel._version()}.so"
    subprocess.run(
        ["c++", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(library)],
        check=True,
    )
    if digest is not None:
        value = cpu_kernel._sha256(library) if digest == "right" else "0" * 64
        (cache / (library.name + ".sha256")).write_text(value + "\n")
    return library


def falls_back(reason_part):
    """Asks for the kernel, expecting a warning naming `reason_part` and the XLA fallback."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = cpu_kernel.unavailable()
    assert reason is not None and reason_part in reason, reason
    assert any("XLA schedules" in str(w.message) for w in caught)
    q, k, v = (jnp.asarray(x) for x in random_inputs(3, 1, 32, 32, 1, head_dim=16)[:3])
    attend = lambda q, k, v: block_sparse.block_sparse_attention(
        q, k, v, pattern=patterns.sliding_window(5), block_q=16
    )
    assert uses_kernel(attend, q, k, v) == (False, False)
    mask = jnp.asarray(patterns.sliding_window(5).mask(32, 32))
    want = dense_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(attend(q, k, v), want, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_library_planted_in_a_shared_cache_is_not_loaded(fresh_kernel_state, tmp_path, mode):
    cache, marker = tmp_path / "shared", tmp_path / "constructor-ran"
    cache.mkdir()
    cache.chmod(mode)
    plant_library(cache, marker, digest="right")
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(cache))
    falls_back("writable by group or others")
    assert not marker.exists()


def test_a_symlinked_cache_is_not_loaded(fresh_kernel_state, tmp_path):
    real, marker = tmp_path / "real", tmp_path / "constructor-ran"
    real.mkdir(mode=0o700)
    plant_library(real, marker, digest="right")
    (tmp_path / "link").symlink_to(real)
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(tmp_path / "link"))
    falls_back("symlink")
    assert not marker.exists()


def test_a_library_whose_digest_does_not_match_is_not_loaded(fresh_kernel_state, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "constructor-ran"
    cache.mkdir(mode=0o700)
    plant_library(cache, marker, digest="wrong")
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(cache))
    falls_back("does not match the digest")
    assert not marker.exists()


def test_a_library_without_a_digest_is_rebuilt_not_loaded(fresh_kernel_state, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "constructor-ran"
    cache.mkdir(mode=0o700)
    library = plant_library(cache, marker, digest=None)
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(cache))
    assert cpu_kernel.unavailable() is None
    assert not marker.exists()
    assert (cache / (library.name + ".sha256")).read_text().strip() == cpu_kernel._sha256(library)


def test_a_library_without_the_kernel_symbols_falls_back(fresh_kernel_state, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "constructor-ran"
    cache.mkdir(mode=0o700)
    plant_library(cache, marker, digest="right")  # trusted: this user's, with its digest
    fresh_kernel_state.setenv("TRANSFORMER_KERNEL_CACHE", str(cache))
    falls_back("lacks a symbol")
