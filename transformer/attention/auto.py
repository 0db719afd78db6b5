"""What "auto" runs: the one rule that picks an attention implementation.

`dot_product_attention(..., implementation="auto")` and `MultiHeadAttention` both ask
`auto_implementation`; `choose_implementation` is the rule itself, on lengths and the backend.
The thresholds were measured on CPU with the benchmarks in `benchmarks/` (see
docs/benchmarks.md for the tables and the commands that made them).
"""

import jax
import jax.numpy as jnp

from transformer import patterns
from transformer.attention.block_sparse import cpu_kernel
from transformer.attention.xla import cudnn_takes

# Dense only where the score matrix is tiny: from 64 x 64 (query, key) pairs up, chunked and
# block-sparse attention beat the dense reference for every pattern on CPU (forward+backward,
# docs/benchmarks.md, "Short sequences"; benchmarks/results/short). Single-query steps (decoding
# with a cache) and the like stay dense.
DENSE_MAX_PAIRS = 32 * 32
# Without block-sparse's fused CPU kernel: causal lengths [low, high) where block-sparse beats
# chunked attention, whose 512-query tiles compute much of the masked half at these lengths.
# Below 512, chunked attention's one small tile beats XLA's block-sparse schedules; from 768 on,
# chunked attention wins again (docs/benchmarks.md, "Short sequences" and "Causal attention from
# 640 to 896 tokens"; benchmarks/results/short and benchmarks/results/causal_mid).
BLOCK_SPARSE_CAUSAL_LENGTHS = (512, 768)
# Block-sparse attention's block size (queries and keys) behind "block_sparse" and "auto".
BLOCK_SIZE = 64
# The longest length at which block-sparse's CPU kernel was measured against chunked attention
# on full and causal attention; its lead shrinks with length and is gone for full attention at
# 64K (docs/benchmarks.md; benchmarks/results/full_causal_long and memory_16k_64k).
KERNEL_MEASURED_LENGTH = 16384
# Head dims cuDNN's fused attention takes on every GPU it runs on: multiples of 8 up to 128
# (Hopper and later go to 256; different query and value dims need Hopper and cuDNN 9.10).
CUDNN_MAX_HEAD_DIM = 128


def choose_implementation(
    pattern,
    q_len,
    kv_len,
    backend=None,
    cpu_kernel=False,
    *,
    dtype=None,
    head_dim=None,
    value_dim=None,
    key_padding=False,
    alibi=False,
    sinks=False,
    logit_soft_cap=False,
):
    """The implementation "auto" uses for this pattern, length, backend and inputs.

    TPU: splash, or block-sparse with ALiBi (the kernel takes no bias). Elsewhere: dense for
    tiny score matrices. GPU: cuDNN's fused kernel where it applies (`cudnn_applies`: half
    precision, full, causal or a window, no sinks, soft cap or ALiBi, head dims it takes),
    block-sparse otherwise. CPU, where block-sparse runs its fused kernel (`cpu_kernel`, see
    `cpu_kernel.supports`): block-sparse for every pattern, within what was measured: it beat
    chunked attention on full and causal attention from 64 to 16,384 tokens. Fewer queries than
    a block (decoding steps, whose one query would be padded to a block of 64) and longer
    sequences follow the rule without the kernel. Otherwise (other backends, or inputs the
    kernel does not take) chunked for full attention and for causal attention outside
    BLOCK_SPARSE_CAUSAL_LENGTHS (exact, linear memory, skips the causal upper half), and
    block-sparse for everything else. CPU measured; the GPU rule is not (no GPU here).

    dtype, head_dim, value_dim: the inputs' (None: unknown, so not cuDNN); key_padding: a key
    padding mask is given; alibi, sinks, logit_soft_cap: whether they are used.
    """
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "block_sparse" if alibi else "splash"
    if q_len * kv_len <= DENSE_MAX_PAIRS:
        return "dense"
    if backend == "gpu":
        cudnn = cudnn_applies(
            pattern,
            q_len,
            kv_len,
            dtype=dtype,
            head_dim=head_dim,
            value_dim=value_dim,
            key_padding=key_padding,
            alibi=alibi,
            sinks=sinks,
            logit_soft_cap=logit_soft_cap,
        )
        return "cudnn" if cudnn else "block_sparse"
    if (
        backend == "cpu"
        and cpu_kernel
        and q_len >= BLOCK_SIZE
        and max(q_len, kv_len) <= KERNEL_MEASURED_LENGTH
    ):
        return "block_sparse"
    if type(pattern) is patterns.Full:
        return "chunked"
    low, high = BLOCK_SPARSE_CAUSAL_LENGTHS
    if type(pattern) is patterns.Causal and q_len == kv_len and not low <= q_len < high:
        return "chunked"
    return "block_sparse"


def cudnn_applies(
    pattern,
    q_len,
    kv_len,
    *,
    dtype,
    head_dim,
    value_dim,
    key_padding=False,
    alibi=False,
    sinks=False,
    logit_soft_cap=False,
):
    """Whether cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`)
    computes this case, as "auto" asks on a GPU.

    It needs bfloat16 or float16 inputs; full, causal, or a window reaching no key right of its
    query (`xla.cudnn_takes`), with equal lengths unless full (its causal alignment is not ours
    to check here); head and value dims equal, multiples of 8, at most CUDNN_MAX_HEAD_DIM; even
    lengths with key padding (the padding becomes a bias, which cuDNN trains only on even
    lengths). jax.nn has no sinks and no soft cap. ALiBi would go in as a `[q_len, kv_len]`
    bias, quadratic memory that block-sparse computes block by block instead.
    """
    if dtype is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if sinks or logit_soft_cap or alibi or not cudnn_takes(pattern):
        return False
    if type(pattern) is not patterns.Full and q_len != kv_len:
        return False
    if head_dim is None or head_dim != value_dim:
        return False
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        return False
    return not (key_padding and (q_len % 2 or kv_len % 2))


def auto_implementation(
    query,
    key,
    value,
    *,
    pattern,
    alibi_slopes=None,
    backend=None,
    key_padding=False,
    logit_soft_cap=None,
    sinks=None,
):
    """The name of the implementation "auto" runs for these arrays and this pattern.

    query `[batch, q_len, heads, head_dim]`, key `[batch, kv_len, kv_heads, head_dim]`, value
    `[batch, kv_len, kv_heads, value_dim]` (arrays or anything with `.shape` and `.dtype`);
    key_padding: whether a key padding mask comes with them; logit_soft_cap and sinks as
    given to `dot_product_attention`.
    """
    kernel = cpu_kernel.supports(
        BLOCK_SIZE, query.shape[-1], value.shape[-1], query.dtype, alibi_slopes
    )
    return choose_implementation(
        pattern,
        query.shape[1],
        key.shape[1],
        backend=backend,
        cpu_kernel=kernel,
        dtype=query.dtype,
        head_dim=query.shape[-1],
        value_dim=value.shape[-1],
        key_padding=key_padding,
        alibi=alibi_slopes is not None,
        sinks=sinks is not None,
        logit_soft_cap=logit_soft_cap is not None,
    )
