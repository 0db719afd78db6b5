"""The floor under any XLA-level block-sparse attention: its block products with nothing moved.

`block_sparse` gathers each row's key and value blocks, computes a few rows per scan step and
scatters the gradients back. This computes the same whole rows, in the same scan steps and
halves, with the same masks, softmax and backward pass, but on inputs already laid out
contiguously: `[steps, heads, items, slots * block, dim]` per row and its mask, built before the
clock starts. Dense rows
(BigBird's anchor rows) go to chunked attention, as in `block_sparse`. What is left is the cost
of XLA's kernels on block-sized products; `attention_benchmark.py` times it as the implementation
"block_products" beside "block_sparse", so the two gaps (to this floor, and from this floor to
the ideal) are measured in one run.

Only whole-row schedules (sliding windows, random blocks, BigBird) are covered; other layouts
are refused.
"""

import jax
import jax.numpy as jnp
import numpy as np

from transformer.attention import block_sparse
from transformer.attention.block_sparse import plan as block_plan
from transformer.attention.block_sparse import xla_schedules
from transformer.attention.chunked import chunked_attention


def _logits(q, k, allowed):
    return jnp.where(allowed, jnp.einsum("hiqd,hikd->hiqk", q, k), -jnp.inf)


def _rows_forward(q, k, v, allowed):
    """q `[heads, items, block, d]`; k, v `[heads, items, keys, d]`; allowed `[items, block,
    keys]` -> out, log-sum-exp, by block_sparse's own softmax."""
    return xla_schedules.softmax_rows(_logits(q, k, allowed), v)


def _rows_backward(q, k, v, allowed, out, lse, d_out):
    probs = jnp.exp(_logits(q, k, allowed) - lse[..., None])
    dv = jnp.einsum("hiqk,hiqd->hikd", probs, d_out)
    d_probs = jnp.einsum("hiqd,hikd->hiqk", d_out, v)
    delta = jnp.einsum("hiqd,hiqd->hiq", d_out, out)
    d_logits = probs * (d_probs - delta[..., None])
    return (
        jnp.einsum("hiqk,hikd->hiqd", d_logits, k),
        jnp.einsum("hiqk,hiqd->hikd", d_logits, q),
        dv,
    )


def _split(x, axis=1):
    """The step's items in two halves, as `xla_schedules._halves` splits them."""
    half = x.shape[axis] // 2
    if x.shape[axis] < 2 * block_plan._ROWS_PER_CHAIN:
        return [x]
    return [
        jax.lax.slice_in_dim(x, 0, half, axis=axis),
        jax.lax.slice_in_dim(x, half, x.shape[axis], axis=axis),
    ]


def _halves(q, k, v, allowed, *rest):
    """Per half: (q, k, v, allowed, *rest); `allowed` has no heads axis, so items are axis 0."""
    parts = [_split(q), _split(k), _split(v), _split(allowed, axis=0)] + [_split(x) for x in rest]
    return list(zip(*parts))


@jax.custom_vjp
def _scheduled_rows(q, k, v, allowed):
    """q `[steps, heads, items, block, d]`; k, v `[steps, heads, items, keys, d]`; allowed
    `[steps, items, block, keys]`."""
    return _scheduled_rows_forward(q, k, v, allowed)[0]


def _scheduled_rows_forward(q, k, v, allowed):
    def step(_, xs):
        return None, [_rows_forward(*half) for half in _halves(*xs)]

    _, halves = jax.lax.scan(step, None, (q, k, v, allowed))
    out = jnp.concatenate([o for o, _ in halves], axis=2)
    lse = jnp.concatenate([part for _, part in halves], axis=2)
    return out, (q, k, v, allowed, out, lse)


def _scheduled_rows_backward(residuals, d_out):
    def step(_, xs):
        grads = [_rows_backward(*half) for half in _halves(*xs)]
        return None, tuple(jnp.concatenate(g, axis=1) for g in zip(*grads))

    _, (dq, dk, dv) = jax.lax.scan(step, None, residuals + (d_out,))
    return dq, dk, dv, None  # the mask has no gradient


_scheduled_rows.defvjp(_scheduled_rows_forward, _scheduled_rows_backward)


def make_step(pattern, q, k, v, block):
    """(jitted fwd+bwd of the products alone, its contiguous inputs) for q, k, v `[1, length, h, d]`.

    Call it as `step(layouts, masks, q, k, v)`; q, k and v feed the dense rows only.

    The loss is `sum(out * q)` over the scheduled rows plus the dense rows' chunked attention,
    like the benchmark's other implementations.
    """
    length, heads, dim = q.shape[1:]
    plan = block_sparse.make_plan(pattern, length, length, block, block)
    if not all(schedule.whole_rows for schedule in plan.schedules):
        raise ValueError(
            "block_products covers whole-row layouts (windows, random blocks, "
            "BigBird) only; this pattern's plan has row pieces."
        )
    scale = dim**-0.5
    blocks = lambda x: np.asarray(xla_schedules._to_blocks(x, plan.num_q_blocks, block))[0]
    q_blocks, k_blocks, v_blocks = blocks(q * scale), blocks(k), blocks(v)  # [h, n, block, d]
    layouts, masks = [], []
    for schedule in plan.schedules:
        rows = np.minimum(schedule.q_block, plan.num_q_blocks - 1)  # [steps, items]
        kv = schedule.kv_block  # [steps, items, slots]
        contiguous = lambda x, kv=kv: np.moveaxis(x[:, kv], 0, 1).reshape(
            kv.shape[0], heads, kv.shape[1], -1, dim
        )
        # [steps, items, block, slots * block]: the block masks side by side, as logits are.
        allowed = np.moveaxis(plan.block_masks[schedule.mask_id], 2, 3).reshape(
            *kv.shape[:2], block, -1
        )
        layouts.append(
            (np.moveaxis(q_blocks[:, rows], 0, 1), contiguous(k_blocks), contiguous(v_blocks))
        )
        masks.append(allowed)
    layouts, masks = jax.device_put((layouts, masks))
    dense_rows = (
        block_sparse.attention._row_positions(plan.dense_q_blocks, block, length)
        if len(plan.dense_q_blocks)
        else None
    )

    def loss(layouts, masks, q, k, v):
        total = sum(
            (_scheduled_rows(*layout, mask) * layout[0]).sum()
            for layout, mask in zip(layouts, masks)
        )
        if dense_rows is not None:
            q_dense = q[:, dense_rows]
            total += (chunked_attention(q_dense, k, v) * q_dense).sum()
        return total

    return jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))), (layouts, masks)
