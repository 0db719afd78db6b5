"""What "auto" runs: the one rule that picks an attention implementation.

`dot_product_attention(..., implementation="auto")` and `MultiHeadAttention` both ask
`auto_implementation`; `choose_implementation` is the rule itself, on lengths and the backend.
The thresholds were measured on CPU with the benchmarks in `benchmarks/` (see
docs/benchmarks.md for the tables and the commands that made them).
"""

import jax

from transformer import patterns
from transformer.attention.block_sparse import cpu_kernel

# Measured on CPU (the minimum of 30 alternated runs, forward+backward, 8 heads of 64): from 64 x
# 64 (query, key) pairs up, chunked and block-sparse attention beat the dense reference for every
# pattern, by 1.2x at 64 tokens and 1.5-2x at 128-512; only single-query steps (decoding with a
# cache) and the like stay dense.
DENSE_MAX_PAIRS = 32 * 32
# Without block-sparse's fused CPU kernel: causal lengths [low, high) where block-sparse beats
# chunked attention, whose 512-query tiles compute much of the masked half at these lengths. At
# 512 tokens XLA's block-sparse schedules won in three runs (12.3 against 13.5 ms, 8.8 against
# 10.6, 11.3 against 15.3; fwd+bwd), and in benchmarks/results/short's block_sparse_xla column
# (9.3 against 11.3); at 640 in benchmarks/results/causal_mid (13 against 17 ms); from 768 on
# chunked wins (18 against 19 ms at 768, 22 against 26 at 896). Below 512, chunked attention's
# one small tile beats the schedules (64-256 tokens: 0.30-2.46 ms against 0.40-3.02 ms).
BLOCK_SPARSE_CAUSAL_LENGTHS = (512, 768)
# Block-sparse attention's block size (queries and keys) behind "block_sparse" and "auto".
BLOCK_SIZE = 64
# The longest length at which block-sparse's CPU kernel was measured against chunked attention
# on full and causal attention (benchmarks/results/full_causal_long: 1.04x at 16,384 for full).
KERNEL_MEASURED_LENGTH = 16384


def choose_implementation(pattern, q_len, kv_len, backend=None, cpu_kernel=False):
    """The implementation "auto" uses for this pattern, length and backend.

    Splash on TPU. Elsewhere: dense for tiny score matrices. Then, where block-sparse runs its
    fused CPU kernel (`cpu_kernel`, see `cpu_kernel.supports`), block-sparse for every
    pattern, within what was measured: it beat chunked attention on full and causal attention
    from 64 to 16,384 tokens. Fewer queries than a block (decoding steps, whose one query would
    be padded to a block of 64) and longer sequences follow the rule without the kernel.
    Otherwise (other backends, or inputs the kernel does not take) chunked for full attention and
    for causal attention outside BLOCK_SPARSE_CAUSAL_LENGTHS (exact, linear memory, skips the
    causal upper half), and block-sparse for everything else. Measured on CPU; GPUs follow the
    CPU rule without the kernel (cuDNN needs half precision and a GPU to measure it on).
    """
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if q_len * kv_len <= DENSE_MAX_PAIRS:
        return "dense"
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


def auto_implementation(query, key, value, *, pattern, alibi_slopes=None, backend=None):
    """The name of the implementation "auto" runs for these arrays and this pattern.

    query `[batch, q_len, heads, head_dim]`, key `[batch, kv_len, heads, head_dim]`, value
    `[batch, kv_len, heads, value_dim]` (arrays or anything with `.shape` and `.dtype`).
    """
    kernel = cpu_kernel.supports(
        BLOCK_SIZE, query.shape[-1], value.shape[-1], query.dtype, alibi_slopes
    )
    name = choose_implementation(
        pattern, query.shape[1], key.shape[1], backend=backend, cpu_kernel=kernel
    )
    if name == "splash" and alibi_slopes is not None:
        return "block_sparse"  # the TPU kernel takes no ALiBi
    return name
