"""The PyTorch peers `peers.py` runs beside this codebase when `torch` is installed (never a
package dependency): CPU `scaled_dot_product_attention`, FlexAttention compiled with
`torch.compile`, PyTorch's matmul, and an eager `nn.TransformerEncoder` classifier of the
train_speed model's sizes with its AdamW training step.

What a PyTorch user would pick on a CPU, with as many threads as cores. Queries, keys and values
are `[batch, heads, length, head_dim]`, PyTorch's layout; the losses are `sum(out * q)`, as on
the JAX side (a constant cotangent would let a backward pass skip work).
"""

import math
import os
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.nn.attention import flex_attention

torch.set_num_threads(os.cpu_count())


def attention_inputs(length, heads, head_dim, requires_grad):
    """q, k, v `[1, heads, length, head_dim]` float32 from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(1, heads, length, head_dim, generator=generator).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def sdpa_step(q, k, v, causal):
    """fn() -> gradients of sum(sdpa(q, k, v) * q) with respect to q, k, v."""

    def step():
        out = functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return torch.autograd.grad((out * q).sum(), (q, k, v))

    return step


def sdpa_forward(q, k, v, causal):
    """`[batch, heads, length, head_dim]`: SDPA's output, without gradients."""
    with torch.no_grad():
        return functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def block_mask(mask, block):
    """A FlexAttention BlockMask of the boolean `mask` `[q_len, kv_len]` (True: attend) in
    `block` x `block` tiles: tiles with every pair allowed skip the mask, tiles with some read it,
    empty tiles are never visited. Built from the mask directly: `create_block_mask` would
    evaluate a predicate over every pair."""
    q_len, kv_len = mask.shape
    if q_len % block or kv_len % block:
        raise ValueError(f"lengths {mask.shape} must be multiples of the block size {block}.")
    tiles = mask.reshape(q_len // block, block, kv_len // block, block)
    full = tiles.all((1, 3))
    partial = tiles.any((1, 3)) & ~full

    def indices(flags):  # [q_blocks, kv_blocks] -> counts [1, 1, q_blocks], indices [1, 1, q, kv]
        order = np.argsort(~flags, axis=1, kind="stable").astype(np.int32)
        counts = flags.sum(1).astype(np.int32)
        return torch.from_numpy(counts)[None, None], torch.from_numpy(order)[None, None]

    dense = torch.from_numpy(np.ascontiguousarray(mask))
    partial_counts, partial_indices = indices(partial)
    full_counts, full_indices = indices(full)
    return flex_attention.BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block,
        mask_mod=lambda b, h, q_index, kv_index: dense[q_index, kv_index],
        seq_lengths=(q_len, kv_len),
    )


def flex_forward(q, k, v, mask, block):
    """fn() -> FlexAttention's output `[1, heads, length, head_dim]` over the boolean `mask`,
    compiled; forward only (FlexAttention has no backward pass on CPU in PyTorch 2.13)."""
    compiled = torch.compile(flex_attention.flex_attention)
    sparse = block_mask(mask, block)

    def step():
        with torch.no_grad():
            return compiled(q, k, v, block_mask=sparse)

    return step


def matmul_flops(n=2048, repeats=5):
    """Float32 FLOP/s of an n x n x n product: the fastest of `repeats`."""
    a = torch.randn(n, n)
    a @ a
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sinusoidal(length, d_model):
    """`[length, d_model]`: sines at even and cosines at odd features, as the JAX model's."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inverse = 10_000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    angles = position * inverse
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(length, d_model)


class EncoderClassifier(nn.Module):
    """Tokens `[batch, length]` -> class logits `[batch, num_classes]`: embedding times
    sqrt(d_model) plus sinusoidal positions, a post-LN `nn.TransformerEncoder` (ReLU, no
    dropout), mean pooling, a linear head: the layers of this codebase's encoder_classifier."""

    def __init__(self, vocab_size, num_classes, d_model, num_heads, d_ff, num_layers, epsilon):
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            d_ff,
            dropout=0.0,
            activation="relu",
            layer_norm_eps=epsilon,
            batch_first=True,
            norm_first=False,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens, blocked=None):
        """blocked: None, or `[length, length]` bool, True where a query may NOT attend (the
        convention of `nn.MultiheadAttention`)."""
        length = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(self.d_model) + sinusoidal(length, self.d_model)
        return self.head(self.encoder(x, mask=blocked).mean(1))


def train_step(sizes, tokens, targets, mask=None, seed=0):
    """fn() -> loss: one AdamW step (lr 1e-3, betas 0.9/0.98, eps 1e-9, weight decay 0.01, the
    gradient clipped to norm 1) of `EncoderClassifier(**sizes)` on `tokens` `[batch, length]`
    int64 and `targets` `[batch]`; mask: None (full attention) or the allowed pairs
    `[length, length]` bool, applied densely."""
    torch.manual_seed(seed)
    model = EncoderClassifier(**sizes).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01, foreach=True
    )
    tokens, targets = torch.from_numpy(tokens).long(), torch.from_numpy(targets).long()
    blocked = None if mask is None else torch.from_numpy(~mask)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = functional.cross_entropy(model(tokens, blocked), targets)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    return step
