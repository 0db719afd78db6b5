"""A PyTorch-eager decoder LM of the benchmark's sizes, with a plain key/value cache: the peer
that `decoding_benchmark.py` runs beside this codebase when `torch` is installed.

It is what a PyTorch user would write: pre-LN layers, fused QKV projection, a preallocated
`[batch, heads, max_len, head_dim]` cache written in place, `scaled_dot_product_attention` over
the filled part (a view, no copy; with a window, its last window + 1 keys), tied output
embedding, greedy argmax, under
`torch.inference_mode()`. Weights are random; only the cost is compared. Never imported by the
package.
"""

import math

import torch
from torch import nn
from torch.nn import functional


class Layer(nn.Module):
    def __init__(self, d_model, num_heads, d_ff, window):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.attention_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.feed_forward_norm = nn.LayerNorm(d_model)
        self.hidden = nn.Linear(d_model, d_ff)
        self.output = nn.Linear(d_ff, d_model)

    def forward(self, x, key_cache, value_cache, position):
        """x `[batch, 1, d_model]` at `position`; writes its key and value into the caches."""
        batch, length, d_model = x.shape
        head_dim = d_model // self.num_heads
        q, k, v = self.qkv(self.attention_norm(x)).split(d_model, dim=-1)
        q, k, v = (
            t.view(batch, length, self.num_heads, head_dim).transpose(1, 2) for t in (q, k, v)
        )
        key_cache[:, :, position : position + length] = k
        value_cache[:, :, position : position + length] = v
        first = 0 if self.window is None else max(0, position - self.window)
        keys = key_cache[:, :, first : position + length]
        values = value_cache[:, :, first : position + length]
        attended = functional.scaled_dot_product_attention(q, keys, values)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, d_model))
        return x + self.output(functional.relu(self.hidden(self.feed_forward_norm(x))))


class DecoderLM(nn.Module):
    def __init__(self, vocab_size, d_model, num_heads, d_ff, num_layers, window=None):
        super().__init__()
        self.d_model, self.num_heads = d_model, num_heads
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            Layer(d_model, num_heads, d_ff, window) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(d_model)

    def sinusoidal(self, position):
        index = torch.arange(0, self.d_model, 2, dtype=torch.float32)
        angles = position / (10_000.0 ** (index / self.d_model))
        return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(self.d_model)

    def empty_cache(self, batch, max_len):
        shape = (batch, self.num_heads, max_len, self.d_model // self.num_heads)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.layers]

    def step(self, token, cache, position):
        """token `[batch]` at `position` -> logits `[batch, vocab]`."""
        x = self.embed(token)[:, None] * math.sqrt(self.d_model) + self.sinusoidal(position)
        for layer, (key_cache, value_cache) in zip(self.layers, cache):
            x = layer(x, key_cache, value_cache, position)
        return self.final_norm(x)[:, 0] @ self.embed.weight.T


@torch.inference_mode()
def greedy(model, start_token, num_tokens, *, max_len=None, start_position=0):
    """num_tokens greedy tokens from position start_position with a cache of max_len positions
    (default start_position + num_tokens); returns `[1, num_tokens]`."""
    max_len = start_position + num_tokens if max_len is None else max_len
    cache = model.empty_cache(1, max_len)
    token = torch.tensor([start_token])
    out = []
    for step in range(num_tokens):
        logits = model.step(token, cache, start_position + step)
        logits[:, 0] = -math.inf  # never padding, as the JAX side
        token = logits.argmax(-1)
        out.append(token)
    return torch.stack(out, 1)


def build(vocab_size, d_model, num_heads, d_ff, num_layers, window=None, seed=0):
    """The model with random weights; `window`: each query sees that many keys back."""
    torch.manual_seed(seed)
    return DecoderLM(vocab_size, d_model, num_heads, d_ff, num_layers, window).eval()
