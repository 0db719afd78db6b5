"""JAX's splash attention (the TPU block-sparse Pallas kernel), built from our patterns.

Splash takes a lazy mask object and asks it for one block at a time while it builds its block
tables, so `PatternMask` evaluates the pattern on exactly the blocks it is asked for: no
`[q_len, kv_len]` array is ever built. On CPU the kernel runs in Pallas interpret mode (slow,
for tests only); on TPU it is compiled.

Non-finite inputs: the kernel multiplies excluded pairs' zero weights by their values inside a
block (0 * NaN = NaN), and gives excluded logits a finite mask value rather than -inf. So when
q, k, v or the sinks hold a NaN or inf, splash computes block-sparse attention's XLA schedules
instead (`block_sparse/`, the same cost class: only the pattern's blocks), which keep what the
mask excludes out of the results and follow the dense reference (docs/attention.md).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from transformer.attention.block_sparse import block_sparse_attention
from transformer.attention.dense import all_finite, kernel_unless_non_finite
from transformer.attention.sinks import check_sinks
from transformer.attention.soft_cap import check_logit_soft_cap

# A sink logit far below any real logit but above the kernel's mask value: a row with a real
# key never notices it, and a row with none puts all its weight on it, so gets zeros.
_SILENT_SINK = kernels.DEFAULT_MASK_VALUE / 2

DEFAULT_BLOCK = 128  # the TPU kernel's block sizes must be multiples of 128 on hardware


class PatternMask(masks.Mask):
    """A `pattern` over `[q_len, kv_len]`, padded to `shape` (padding is masked), served by block."""

    def __init__(self, pattern, q_len, kv_len, shape):
        self.pattern, self.q_len, self.kv_len, self._shape = pattern, q_len, kv_len, shape

    @property
    def shape(self):
        return self._shape

    def __getitem__(self, index):
        rows, cols = index
        q_pos = np.arange(*rows.indices(self._shape[0]))[:, None]
        k_pos = np.arange(*cols.indices(self._shape[1]))[None, :]
        allowed = self.pattern.allows(
            np.minimum(q_pos, self.q_len - 1),
            np.minimum(k_pos, self.kv_len - 1),
            self.q_len,
            self.kv_len,
        )
        return allowed & (q_pos < self.q_len) & (k_pos < self.kv_len)

    def __eq__(self, other):
        return isinstance(other, PatternMask) and (
            self.pattern,
            self.q_len,
            self.kv_len,
            self._shape,
        ) == (other.pattern, other.q_len, other.kv_len, other._shape)

    def __hash__(self):
        return hash((PatternMask, self.pattern, self.q_len, self.kv_len, self._shape))


def splash_attention(
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
    segment_ids=None,
    block_size=DEFAULT_BLOCK,
    interpret=None,
):
    """Splash attention over `pattern`.

    Args:
      query: `[batch, q_len, heads, head_dim]`; key, value: `[batch, kv_len, kv_heads,
        head_dim]`, kv_heads dividing heads (the kernel's own grouped-query attention).
      pattern: a `transformer.patterns` pattern.
      key_valid: bool `[batch, kv_len]` or None; passed as splash segment ids.
      scale: defaults to 1/sqrt(head_dim).
      alibi_slopes: not supported by the kernel (it takes no bias): must be None.
      logit_soft_cap: None or a float c > 0: the kernel's `attn_logits_soft_cap`, which caps
        the scaled scores before masking.
      sinks: None or `[heads]` sink logits: the kernel's own `sinks` (differentiable).
      segment_ids: None or a pair (q_segment_ids `[batch, q_len]`, kv_segment_ids
        `[batch, kv_len]`) of ints (packed documents): the kernel's own segment ids.
      block_size: the kernel's query and key block; lengths are padded up to it.
      interpret: run the Pallas kernel in interpret mode; defaults to True off TPU.

    Returns:
      `[batch, q_len, heads, head_dim]`; zeros for queries with no allowed key.
    """
    if alibi_slopes is not None:
        raise ValueError(
            "implementation 'splash' takes no alibi_slopes (the TPU kernel has no "
            "bias input); use 'block_sparse' or 'chunked' for ALiBi."
        )
    check_sinks(sinks, query.shape[2])
    logit_soft_cap = check_logit_soft_cap(logit_soft_cap)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if scale is None:
        scale = query.shape[-1] ** -0.5
    options = dict(
        pattern=pattern,
        key_valid=key_valid,
        scale=scale,
        logit_soft_cap=logit_soft_cap,
        segment_ids=segment_ids,
    )
    kernel = functools.partial(
        _kernel_attention, block_size=block_size, interpret=interpret, **options
    )
    # The schedules' blocks at most the sequence's: a 128-block over 40 tokens is mostly padding.
    exact_block = min(block_size, max(16, -(-max(query.shape[1], key.shape[1]) // 16) * 16))
    exact = functools.partial(block_sparse_attention, block_q=exact_block, **options)
    # A sink of -inf is no sink; a NaN or +inf sink is non-finite input like any other.
    finite = all_finite(query, key, value)
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        finite = finite & ~jnp.any(jnp.isnan(sinks) | jnp.isposinf(sinks))
    return kernel_unless_non_finite(
        finite,
        lambda q, k, v, s: kernel(q, k, v, sinks=s),
        lambda q, k, v, s: exact(q, k, v, sinks=s),
        query,
        key,
        value,
        sinks,
    )


def _kernel_attention(
    query,
    key,
    value,
    *,
    pattern,
    key_valid,
    scale,
    logit_soft_cap,
    sinks,
    segment_ids,
    block_size,
    interpret,
):
    """`splash_attention` by the Pallas kernel: finite inputs (see the module's docstring)."""
    batch, q_len, heads, _ = query.shape
    kv_len = key.shape[1]
    q_pad, kv_pad = -(-q_len // block_size) * block_size, -(-kv_len // block_size) * block_size
    mask = PatternMask(pattern, q_len, kv_len, (q_pad, kv_pad))
    blocks = kernels.BlockSizes(
        block_q=block_size,
        block_kv=block_size,
        block_kv_compute=block_size,
        block_q_dkv=block_size,
        block_kv_dkv=block_size,
        block_kv_dkv_compute=block_size,
        block_q_dq=block_size,
        block_kv_dq=block_size,
    )
    kernel = kernels.make_splash_mha_single_device(
        masks.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        attn_logits_soft_cap=logit_soft_cap,
        interpret=interpret,
    )

    def to_heads_first(x, length):  # [batch, length, heads, d] -> [batch, heads, padded, d]
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q = to_heads_first(query * jnp.asarray(scale, query.dtype), q_pad)
    k, v = to_heads_first(key, kv_pad), to_heads_first(value, kv_pad)
    valid = jnp.ones((batch, kv_len), bool) if key_valid is None else key_valid
    valid = jnp.pad(valid, ((0, 0), (0, kv_pad - kv_len)))
    if segment_ids is None:
        # Segment ids: queries are segment 0, valid keys 0, padded keys 1, so padded keys are
        # unseen.
        segments = kernels.SegmentIds(
            q=jnp.zeros((batch, q_pad), jnp.int32), kv=jnp.where(valid, 0, 1).astype(jnp.int32)
        )
    else:
        q_ids, kv_ids = (jnp.asarray(x, jnp.int32) for x in segment_ids)
        # Padded keys take an id below every query's, so that no query sees them.
        unseen = jnp.min(q_ids) - 1
        kv_ids = jnp.pad(kv_ids, ((0, 0), (0, kv_pad - kv_len)))
        segments = kernels.SegmentIds(
            q=jnp.pad(q_ids, ((0, 0), (0, q_pad - q_len))), kv=jnp.where(valid, kv_ids, unseen)
        )
    if sinks is None:
        sinks = jnp.full((heads,), _SILENT_SINK, jnp.float32)
    else:
        # Masked scores are the kernel's mask value, not -inf: a sink of -inf (no sink) would
        # let a row without keys average them. The floor changes nothing else: exp(floor - m)
        # is 0 for any real logit m.
        sinks = jnp.maximum(jnp.asarray(sinks, jnp.float32), _SILENT_SINK)
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s, sinks=sinks))(
        q, k, v, segments
    )
    out = out.transpose(0, 2, 1, 3)[:, :q_len]
    return out.astype(query.dtype)
