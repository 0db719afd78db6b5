"""`jax.nn.dot_product_attention` ("xla" and "cudnn") behind our pattern interface.

jax.nn expresses full, causal and sliding-window attention natively (`is_causal`,
`local_window_size`); on XLA those arguments only build a mask, so they save no work on CPU.
Other patterns go in as a dense boolean mask ("xla" only). cuDNN's fused kernel needs a CUDA GPU
and float16/bfloat16 inputs, and takes only the native patterns.

Non-finite inputs: jax.nn multiplies excluded pairs' zero weights by their values (0 * NaN =
NaN) and differentiates through them, so when q, k or v hold a NaN or inf, "xla" computes the
careful dense reference instead (`dense.py`, the same cost class: both materialise the
scores), and "cudnn" block-sparse attention's XLA schedules (which, like cuDNN's kernel, never
hold the whole score matrix); both keep what the mask excludes out of the results.
"""

import functools

import jax
import jax.numpy as jnp

from transformer import patterns
from transformer.attention.block_sparse import block_sparse_attention
from transformer.attention.dense import (
    alibi_bias,
    all_finite,
    careful_dense_attention,
    kernel_unless_non_finite,
)


def _native_arguments(pattern):
    """jax.nn arguments (is_causal, local_window_size) for `pattern`, or None if it has none."""
    if isinstance(pattern, patterns.Full):
        return {}
    if isinstance(pattern, patterns.Causal):
        return {"is_causal": True}
    if isinstance(pattern, patterns.SlidingWindow):
        return {"local_window_size": (pattern.left, pattern.right)}
    if isinstance(pattern, patterns.Intersection) and len(pattern.parts) == 2:
        window = [p for p in pattern.parts if isinstance(p, patterns.SlidingWindow)]
        if window and any(isinstance(p, patterns.Causal) for p in pattern.parts):
            return {"local_window_size": (window[0].left, 0)}
    return None


def cudnn_takes(pattern):
    """Whether cuDNN's fused kernel computes `pattern` natively: full, causal, or a window that
    reaches no key right of its query (cuDNN's windows end at the query unless causal)."""
    arguments = _native_arguments(pattern)
    if arguments is None:
        return False
    return arguments.get("is_causal", False) or arguments.get("local_window_size", (0, 0))[1] == 0


def refuse_soft_cap_and_sinks(implementation, logit_soft_cap, sinks, reason):
    """A ValueError for an implementation that computes neither soft-capping nor sinks."""
    for name, given in (("logit_soft_cap", logit_soft_cap), ("sinks", sinks)):
        if given is not None:
            raise ValueError(
                f"implementation {implementation!r} takes no {name} ({reason}); use 'dense', "
                "'chunked', 'block_sparse', 'splash' or 'auto'."
            )


def _jax_nn_attention(
    query,
    key,
    value,
    *,
    pattern,
    key_valid,
    scale,
    alibi_slopes,
    implementation,
    logit_soft_cap=None,
    sinks=None,
):
    refuse_soft_cap_and_sinks(
        implementation,
        logit_soft_cap,
        sinks,
        "jax.nn.dot_product_attention has no soft cap and no sinks",
    )
    q_len, kv_len = query.shape[1], key.shape[1]
    arguments = _native_arguments(pattern)
    if implementation == "cudnn" and not cudnn_takes(pattern):
        raise ValueError(
            f"implementation 'cudnn' takes full(), causal(), sliding_window(left, 0) and "
            f"sliding_window(...) & causal() only (cuDNN has no window to the right of a "
            f"query); got {pattern}. Use 'block_sparse' or 'xla'."
        )
    fused = functools.partial(
        _fused,
        pattern=pattern,
        key_valid=key_valid,
        scale=scale,
        alibi_slopes=alibi_slopes,
        implementation=implementation,
        arguments=arguments,
    )

    def reference(query, key, value):
        mask = jnp.asarray(pattern.mask(q_len, kv_len))[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :]
        out = careful_dense_attention(
            query,
            key,
            value,
            mask=mask,
            scale=query.shape[-1] ** -0.5 if scale is None else scale,
            alibi_slopes=alibi_slopes,
        )
        return out.astype(query.dtype)

    # Inputs holding a NaN or inf take the dense reference for "xla", block-sparse's XLA
    # schedules for "cudnn" (which, like cuDNN's kernel, never hold the whole score matrix, so
    # the branch reserves no quadratic memory).
    exact = reference
    if implementation == "cudnn":
        exact = functools.partial(
            block_sparse_attention,
            pattern=pattern,
            key_valid=key_valid,
            scale=scale,
            alibi_slopes=alibi_slopes,
        )
    finite = all_finite(query, key, value)
    return kernel_unless_non_finite(finite, fused, exact, query, key, value)


def _fused(
    query, key, value, *, pattern, key_valid, scale, alibi_slopes, implementation, arguments
):
    """jax.nn's attention, with zeros for queries that have no allowed key."""
    q_len, kv_len = query.shape[1], key.shape[1]
    mask = None if arguments is not None else jnp.asarray(pattern.mask(q_len, kv_len))[None, None]
    if key_valid is not None:
        key_mask = key_valid[:, None, None, :]
        mask = key_mask if mask is None else mask & key_mask
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, q_len, kv_len).astype(query.dtype)
    out = jax.nn.dot_product_attention(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        scale=scale,
        implementation=implementation,
        **(arguments or {}),
    )
    # jax.nn gives a query with no allowed key the mean of all values; we promise zeros.
    if key_valid is None:
        has_key = jnp.asarray(pattern.mask(q_len, kv_len).any(-1))[None, :]
    else:
        # The pattern's own mask is NumPy, built at trace time: `allows` on traced positions
        # would fail for composed patterns, which combine their parts with NumPy.
        pattern_allows = (
            mask[:, 0] if arguments is None else jnp.asarray(pattern.mask(q_len, kv_len))
        )
        allowed = pattern_allows & key_mask[:, 0]
        has_key = jnp.any(allowed, axis=-1)
    return jnp.where(has_key[:, :, None, None], out, 0.0).astype(query.dtype)


def xla_attention(
    query,
    key,
    value,
    *,
    pattern,
    key_valid=None,
    scale=None,
    alibi_slopes=None,
    logit_soft_cap=None,
    sinks=None,
):
    """`jax.nn.dot_product_attention(implementation="xla")`: materialises the scores. No soft
    cap and no sinks (jax.nn has neither): a ValueError."""
    return _jax_nn_attention(
        query,
        key,
        value,
        pattern=pattern,
        key_valid=key_valid,
        scale=scale,
        alibi_slopes=alibi_slopes,
        implementation="xla",
        logit_soft_cap=logit_soft_cap,
        sinks=sinks,
    )


def cudnn_attention(
    query,
    key,
    value,
    *,
    pattern,
    key_valid=None,
    scale=None,
    alibi_slopes=None,
    logit_soft_cap=None,
    sinks=None,
):
    """`jax.nn.dot_product_attention(implementation="cudnn")`: fused kernel on NVIDIA GPUs. No
    soft cap and no sinks (jax.nn has neither): a ValueError."""
    refuse_soft_cap_and_sinks(
        "cudnn", logit_soft_cap, sinks, "jax.nn.dot_product_attention has no soft cap and no sinks"
    )
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"implementation 'cudnn' needs a CUDA GPU; this backend is "
            f"{jax.default_backend()!r}. Use 'xla', 'chunked' or 'block_sparse'."
        )
    return _jax_nn_attention(
        query,
        key,
        value,
        pattern=pattern,
        key_valid=key_valid,
        scale=scale,
        alibi_slopes=alibi_slopes,
        implementation="cudnn",
    )
