"""What "auto" runs: the one rule that picks an attention implementation.

`dot_product_attention(..., implementation="auto")` and `MultiHeadAttention` both ask
`auto_implementation`; `choose_implementation` is the rule itself, on lengths and the backend.
The thresholds were measured on CPU with the benchmarks in `benchmarks/` (see
docs/benchmarks.md for the tables and the commands that made them).
"""

import jax

from transformer import patterns
from transformer.attention.block_sparse import cpu_kernel

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
