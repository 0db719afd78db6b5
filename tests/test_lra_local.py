"""The Long Range Arena's "local" attention: its pattern, and its implementation against a
float64 transcription of LRA's code, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_implementations import random_inputs, reference

from transformer import patterns
from transformer.attention import dot_product_attention


def lra_groups(length, block_size):
    """Each position's group under LRA's reshape of the padded length to
    [block_size, num_blocks] (row-major), and num_blocks."""
    padded = length + block_size - length % block_size
    num_blocks = padded // block_size
    group = np.empty(padded, int)
    group[np.arange(padded).reshape(block_size, num_blocks)] = np.arange(num_blocks)[None, :]
    return group[:length], num_blocks


@pytest.mark.parametrize("length, block_size", [(24, 4), (23, 4), (25, 6), (7, 10)])
def test_pattern_is_lra_reshape(length, block_size):
    group, num_blocks = lra_groups(length, block_size)
    pattern = patterns.lra_local(block_size)
    assert pattern.stride(length) == num_blocks
    np.testing.assert_array_equal(pattern.mask(length, length), group[:, None] == group[None, :])
    np.testing.assert_array_equal(
        pattern.block_layout(length, length, 4),
        patterns.strided(num_blocks).block_layout(length, length, 4),
    )


def lra_literal(q, k, v, d_out, key_valid, block_size):
    """LRA's LocalAttention on projected q, k, v `[batch, length, heads, dim]` in float64, by
    gathering each query's keys (not by reshaping), and its gradients for the cotangent d_out.

    Query p is (index a, group g) = (p // num_blocks, p % num_blocks); its keys are the
    positions c * num_blocks + g; key c is allowed where mask[g * block_size + a] *
    mask[g * block_size + c] > 0 on the padding mask padded with -1e9; others get -1e10 added,
    which in LRA's float32 leaves exactly -1e10 for any logit under 512 in magnitude."""
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    batch, length, heads, dim = q.shape
    padded = length + block_size - length % block_size
    num_blocks = padded // block_size
    p = np.arange(length)
    g, a = p % num_blocks, p // num_blocks
    keys = np.arange(block_size)[None, :] * num_blocks + g[:, None]  # [length, block_size]
    mask = np.full((batch, padded), -1e9)
    mask[:, :length] = key_valid
    row = mask[:, g * block_size + a]  # [batch, length]
    column = mask[:, g[:, None] * block_size + np.arange(block_size)[None, :]]
    bias = np.where(row[:, :, None] * column > 0, 0.0, -1e10)  # [batch, length, block_size]

    def pad(x):
        return np.concatenate([x, np.zeros((batch, padded - length, heads, dim))], axis=1)

    k_keys, v_keys = pad(k)[:, keys], pad(v)[:, keys]  # [batch, length, block_size, heads, dim]
    logits = np.einsum("bphd,bpchd->bhpc", q, k_keys) / np.sqrt(dim)
    logits = np.where(bias[:, None] < 0, -1e10, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhpc,bpchd->bphd", probs, v_keys)
    d_probs = np.einsum("bphd,bpchd->bhpc", d_out, v_keys)
    d_logits = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True)) / np.sqrt(dim)
    dq = np.einsum("bhpc,bpchd->bphd", d_logits, k_keys)
    dk, dv = np.zeros((batch, padded, heads, dim)), np.zeros((batch, padded, heads, dim))
    for c in range(block_size):
        np.add.at(dk, (slice(None), keys[:, c]), np.einsum("bhp,bphd->bphd", d_logits[..., c], q))
        np.add.at(dv, (slice(None), keys[:, c]), np.einsum("bhp,bphd->bphd", probs[..., c], d_out))
    return out, (dq, dk[:, :length], dv[:, :length])


def lra_local(q, k, v, key_valid):
    mask = None if key_valid is None else jnp.asarray(key_valid)[:, None, None, :]
    return dot_product_attention(
        q, k, v, mask=mask, pattern=patterns.lra_local(4), implementation="lra_local"
    )


@pytest.mark.parametrize("length", [24, 23, 9])
@pytest.mark.parametrize("padding", [False, True])
def test_equals_lra_code_forward_and_gradients(length, padding):
    q, k, v, d_out, key_valid, _ = random_inputs(length, 2, length, length, 2, padding=padding)
    if key_valid is None:
        key_valid = np.ones((2, length), bool)
    else:
        key_valid[0, :5] = True
    out_ref, grads_ref = lra_literal(q, k, v, d_out, key_valid, 4)
    out, vjp = jax.vjp(lambda *x: lra_local(*x, key_valid), q, k, v)
    np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=1e-5)
    for grad, grad_ref in zip(vjp(jnp.asarray(d_out)), grads_ref):
        np.testing.assert_allclose(grad, grad_ref, atol=5e-5, rtol=1e-4)


def test_padding_is_read_from_other_positions():
    """Where LRA's contiguous reading of the mask differs from the positions attended, its
    result differs from the pattern with plain key padding: the quirk is reproduced."""
    q, k, v, d_out, key_valid, _ = random_inputs(3, 2, 24, 24, 2, padding=True)
    key_valid[0, :5] = True
    allowed = patterns.lra_local(4).mask(24, 24)[None] & key_valid[:, None, :]
    plain, _ = reference(q, k, v, d_out, allowed, 8**-0.5, None)
    assert np.abs(np.asarray(lra_local(q, k, v, key_valid)) - plain).max() > 0.1


def test_other_patterns_and_cross_attention_are_refused():
    q = jnp.ones((1, 8, 1, 8))
    with pytest.raises(ValueError, match=r"'lra_local' computes patterns.lra_local"):
        dot_product_attention(q, q, q, pattern=patterns.strided(2), implementation="lra_local")
    with pytest.raises(ValueError, match=r"self-attention: q_len 8 != kv_len 4"):
        dot_product_attention(
            q, q[:, :4], q[:, :4], pattern=patterns.lra_local(2), implementation="lra_local"
        )
    with pytest.raises(ValueError, match=r"lra_local block_size"):
        patterns.lra_local(0)
