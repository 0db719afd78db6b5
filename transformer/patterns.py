"""Attention patterns: which key positions each query position may attend to.

A pattern is data: a frozen, hashable description (so it can be a static argument under
`jax.jit`) of a predicate over (query position i, key position j). Patterns compose with `|`
(union) and `&` (intersection). From one pattern come

- `mask(q_len, kv_len)`: the NumPy boolean `[q_len, kv_len]` matrix, the reference;
- `block_layout(q_len, kv_len, block_q, block_kv)`: for each block of the score matrix, whether
  it is EMPTY (skip it), PARTIAL (compute it under a mask) or FULL (compute it, no mask needed),
  which is what block-sparse implementations walk, computed without building the mask;
- `draw(...)`: a picture of the mask.

    >>> p = sliding_window(2) & causal()
    >>> p.mask(4, 4).astype(int)
    array([[1, 0, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 0],
           [0, 1, 1, 1]])

Draw every named pattern into a folder with `python -m transformer.patterns --out docs/patterns`.
"""

import argparse
import dataclasses
import functools
import inspect
import os

import numpy as np

# Block kinds in a block layout, ordered so that union is max() and intersection is min().
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """Blocks of `size` positions tiling `[0, length)`; the last one may stick out (padding)."""

    length: int
    size: int

    @property
    def count(self):
        return -(-self.length // self.size)

    @property
    def first(self):
        """`[count]`: first position of each block."""
        return np.arange(self.count) * self.size

    @property
    def last(self):
        """`[count]`: last position of each block that is inside `[0, length)`."""
        return np.minimum(self.first + self.size, self.length) - 1

    @property
    def complete(self):
        """`[count]`: True where the block lies entirely inside `[0, length)`."""
        return self.first + self.size <= self.length


def _check_lengths(q_len, kv_len):
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")


class Pattern:
    """Base class: subclasses define `allows` and `_layout`; this adds masks, layouts and `|`/`&`."""

    def allows(self, q_pos, k_pos, q_len, kv_len):
        """Boolean array: may query position `q_pos` attend to key position `k_pos`?

        `q_pos` and `k_pos` are integer NumPy arrays that broadcast against each other, with
        values in `[0, q_len)` and `[0, kv_len)`.
        """
        raise NotImplementedError

    def _layout(self, q_blocks, k_blocks):
        """`[num_q_blocks, num_k_blocks]` of EMPTY/PARTIAL/FULL for blocks clipped to the lengths.

        May answer PARTIAL for a block that is in fact empty or full (never the other way round):
        that only costs work, never correctness.
        """
        raise NotImplementedError

    def mask(self, q_len, kv_len):
        """NumPy bool `[q_len, kv_len]`, True where query i may attend to key j: the reference."""
        _check_lengths(q_len, kv_len)
        allowed = self.allows(np.arange(q_len)[:, None], np.arange(kv_len)[None, :], q_len, kv_len)
        return np.array(np.broadcast_to(allowed, (q_len, kv_len)))

    def block_layout(self, q_len, kv_len, block_q, block_kv=None):
        """NumPy int8 `[ceil(q_len / block_q), ceil(kv_len / block_kv)]` of EMPTY, PARTIAL, FULL.

        Blocks that stick out past the lengths (the padding a block-sparse kernel adds) count as
        PARTIAL at best, since their out-of-range keys must be masked.
        """
        _check_lengths(q_len, kv_len)
        block_kv = block_q if block_kv is None else block_kv
        for name, value in (("block_q", block_q), ("block_kv", block_kv)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        q_blocks, k_blocks = _Blocks(q_len, block_q), _Blocks(kv_len, block_kv)
        layout = np.asarray(self._layout(q_blocks, k_blocks), np.int8)
        complete = q_blocks.complete[:, None] & k_blocks.complete[None, :]
        return np.where((layout == FULL) & ~complete, np.int8(PARTIAL), layout)

    def density(self, q_len, kv_len):
        """Fraction of (query, key) pairs the pattern allows."""
        return float(self.mask(q_len, kv_len).mean())

    def draw(self, q_len, kv_len=None, path=None, *, title=None, ax=None):
        """Draws the mask (and returns the matplotlib Axes); writes a PNG when `path` is given."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kv_len = q_len if kv_len is None else kv_len
        figure = None
        if ax is None:
            figure, ax = plt.subplots(figsize=(4, 4 * q_len / kv_len))
        ax.imshow(
            self.mask(q_len, kv_len), cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest"
        )
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position i")
        ax.set_title(title if title is not None else str(self), fontsize=8)
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
            if figure is not None:
                plt.close(figure)
        return ax

    # full() is the identity of `&` and absorbs `|`: simplifying here keeps `full() & causal()`
    # the plain causal() that implementations recognise (chunked attention skips its upper half).
    def __or__(self, other):
        other = _check_pattern(other)
        if isinstance(self, Full) or isinstance(other, Full):
            return Full()
        if self == other:
            return self
        return Union(_flatten(Union, self) + _flatten(Union, other))

    def __and__(self, other):
        other = _check_pattern(other)
        if isinstance(self, Full):
            return other
        if isinstance(other, Full) or self == other:
            return self
        return Intersection(_flatten(Intersection, self) + _flatten(Intersection, other))


def _check_pattern(value):
    if not isinstance(value, Pattern):
        raise TypeError(f"patterns combine only with patterns; got {type(value).__name__}.")
    return value


def _flatten(kind, pattern):
    return pattern.parts if isinstance(pattern, kind) else (pattern,)


@dataclasses.dataclass(frozen=True)
class Full(Pattern):
    """Every query attends to every key."""

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return np.ones(np.broadcast_shapes(np.shape(q_pos), np.shape(k_pos)), bool)

    def _layout(self, q_blocks, k_blocks):
        return np.full((q_blocks.count, k_blocks.count), FULL)

    def __str__(self):
        return "full()"


@dataclasses.dataclass(frozen=True)
class Causal(Pattern):
    """Query i attends to keys j <= i: the mask of decoders, which must not see the future."""

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return k_pos <= q_pos

    def _layout(self, q_blocks, k_blocks):
        full = k_blocks.last[None, :] <= q_blocks.first[:, None]
        empty = k_blocks.first[None, :] > q_blocks.last[:, None]
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))

    def __str__(self):
        return "causal()"


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Query i attends to keys i - left <= j <= i + right."""

    left: int
    right: int

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return (k_pos >= q_pos - self.left) & (k_pos <= q_pos + self.right)

    def _layout(self, q_blocks, k_blocks):
        q_first, q_last = q_blocks.first[:, None], q_blocks.last[:, None]
        k_first, k_last = k_blocks.first[None, :], k_blocks.last[None, :]
        full = (k_first >= q_last - self.left) & (k_last <= q_first + self.right)
        # Empty when the key block misses the union of all windows, [q_first - left, q_last + right].
        empty = (k_last < q_first - self.left) | (k_first > q_last + self.right)
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))

    def __str__(self):
        if self.left == self.right:
            return f"sliding_window({self.left})"
        return f"sliding_window({self.left}, {self.right})"


@dataclasses.dataclass(frozen=True)
class Strided(Pattern):
    """Query i attends to keys j with (i - j) % stride == 0: the keys at its position mod stride.

    The strided pattern of the Sparse Transformer (Child et al., 2019). It is also what the Long
    Range Arena's "LocalAttention" computes: reshaping `[batch, length]` to
    `[batch, block_size, num_blocks]` and attending along the block_size axis lets position i see
    the positions that share i % num_blocks, so it is `strided(num_blocks)`, not a local window.
    """

    stride: int

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return (q_pos - k_pos) % self.stride == 0

    def _layout(self, q_blocks, k_blocks):
        # Over a block the differences i - j are every integer in [low, high]; the block is empty
        # iff no multiple of stride lies there, full iff every integer there is one.
        low = q_blocks.first[:, None] - k_blocks.last[None, :]
        high = q_blocks.last[:, None] - k_blocks.first[None, :]
        empty = high // self.stride * self.stride < low
        full = (low % self.stride == 0) & ((self.stride == 1) | (low == high))
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))

    def __str__(self):
        return f"strided({self.stride})"


@dataclasses.dataclass(frozen=True)
class LraLocal(Pattern):
    """The Long Range Arena's "LocalAttention" with `block_size`, as its code lays positions out.

    LRA pads a sequence of n tokens with `block_size - n % block_size` more (a whole block when
    n is a multiple), reshapes the padded length to `[block_size, num_blocks]` and attends along
    block_size, so query i sees the keys j with i = j (mod num_blocks): `strided(num_blocks)`
    with a stride that depends on the length. This pattern is that position rule; the
    implementation "lra_local" also reproduces how LRA masks padding.
    """

    block_size: int

    def stride(self, kv_len):
        """num_blocks of LRA's reshape for a sequence of kv_len tokens."""
        return (kv_len + self.block_size - kv_len % self.block_size) // self.block_size

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return (q_pos - k_pos) % self.stride(kv_len) == 0

    def _layout(self, q_blocks, k_blocks):
        return Strided(self.stride(k_blocks.length))._layout(q_blocks, k_blocks)

    def __str__(self):
        return f"lra_local({self.block_size})"


@dataclasses.dataclass(frozen=True)
class PrefixLM(Pattern):
    """Bidirectional among the first `prefix_length` positions, causal after them.

    Query i attends to key j iff j <= i, or both i and j are in the prefix (< prefix_length):
    the prefix language model of T5 and UniLM, where a prompt sees itself whole and the
    continuation is generated left to right. This is the attention-level pattern. A decoder
    layer intersects its pattern with this one rather than with causal() when the pattern has
    a prefix_lm part (`decoder_mask` in transformer/modules/models.py), so the prefix stays
    bidirectional there too.
    """

    prefix_length: int

    def allows(self, q_pos, k_pos, q_len, kv_len):
        prefix = self.prefix_length
        return (k_pos <= q_pos) | ((q_pos < prefix) & (k_pos < prefix))

    def _layout(self, q_blocks, k_blocks):
        prefix = self.prefix_length
        q_first, q_last = q_blocks.first[:, None], q_blocks.last[:, None]
        k_first, k_last = k_blocks.first[None, :], k_blocks.last[None, :]
        # Full when every key is at or before every query, or every key is in the prefix (a pair
        # with j > i then has i < j < prefix too).
        full = (k_last <= q_first) | (k_last < prefix)
        # Empty when every key is after every query and no (query, key) pair is in the prefix.
        empty = (k_first > q_last) & ((q_first >= prefix) | (k_first >= prefix))
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))

    def __str__(self):
        return f"prefix_lm({self.prefix_length})"


@dataclasses.dataclass(frozen=True)
class Anchor(Pattern):
    """Global tokens: anchor positions attend to every key, and every query attends to them."""

    positions: tuple

    def _is_anchor(self, length):
        """`[length]` bool: which positions are anchors (those past `length` are dropped)."""
        is_anchor = np.zeros(length, bool)
        positions = np.asarray(self.positions, np.int64)
        is_anchor[positions[positions < length]] = True
        return is_anchor

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return self._is_anchor(q_len)[q_pos] | self._is_anchor(kv_len)[k_pos]

    def _layout(self, q_blocks, k_blocks):
        q_count = _count_in_blocks(self._is_anchor(q_blocks.length), q_blocks)[:, None]
        k_count = _count_in_blocks(self._is_anchor(k_blocks.length), k_blocks)[None, :]
        q_size = (q_blocks.last - q_blocks.first + 1)[:, None]
        k_size = (k_blocks.last - k_blocks.first + 1)[None, :]
        full = (q_count == q_size) | (k_count == k_size)
        empty = (q_count == 0) & (k_count == 0)
        return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL))

    def __str__(self):
        if self.positions == tuple(range(len(self.positions))):
            return f"anchor({len(self.positions)})"
        return f"anchor(positions={list(self.positions)})"


def _count_in_blocks(flags, blocks):
    """`[blocks.count]`: how many True `flags` fall in each block."""
    cumulative = np.concatenate([[0], np.cumsum(flags)])
    return cumulative[blocks.last + 1] - cumulative[blocks.first]


@dataclasses.dataclass(frozen=True)
class RandomBlocks(Pattern):
    """Each block of `block_size` queries attends to `num_blocks` key blocks drawn from `seed`.

    Query block r draws its key blocks from a generator seeded by (seed, r), so the draw is the
    same on every host and in every run, and a block's draw does not depend on the query length.
    It does depend on the number of key blocks it draws from (all of them, without repeats).
    """

    num_blocks: int
    block_size: int
    seed: int

    def key_blocks(self, q_len, kv_len):
        """`[ceil(q_len / block_size), min(num_blocks, num key blocks)]`: each row's key blocks."""
        return _random_key_blocks(
            self.num_blocks, self.seed, -(-q_len // self.block_size), -(-kv_len // self.block_size)
        )

    def _coarse_mask(self, q_len, kv_len):
        """`[num query blocks, num key blocks]` bool at this pattern's own block size."""
        table = self.key_blocks(q_len, kv_len)
        coarse = np.zeros((table.shape[0], -(-kv_len // self.block_size)), bool)
        np.put_along_axis(coarse, table, True, axis=1)
        return coarse

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return self._coarse_mask(q_len, kv_len)[q_pos // self.block_size, k_pos // self.block_size]

    def _layout(self, q_blocks, k_blocks):
        # The mask is constant on cells of block_size x block_size: count the True cells that each
        # (query block, key block) rectangle covers, with a 2-D prefix sum.
        coarse = self._coarse_mask(q_blocks.length, k_blocks.length)
        prefix = np.zeros((coarse.shape[0] + 1, coarse.shape[1] + 1), np.int64)
        prefix[1:, 1:] = coarse.cumsum(0).cumsum(1)
        r0, r1 = q_blocks.first // self.block_size, q_blocks.last // self.block_size + 1
        c0, c1 = k_blocks.first // self.block_size, k_blocks.last // self.block_size + 1
        count = prefix[r1][:, c1] - prefix[r0][:, c1] - prefix[r1][:, c0] + prefix[r0][:, c0]
        area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
        return np.where(count == area, FULL, np.where(count == 0, EMPTY, PARTIAL))

    def __str__(self):
        return f"random({self.num_blocks}, {self.block_size}, seed={self.seed})"


@functools.lru_cache(maxsize=64)
def _random_key_blocks(num_blocks, seed, num_q_blocks, num_k_blocks):
    draws = min(num_blocks, num_k_blocks)
    table = np.empty((num_q_blocks, draws), np.int64)
    for row in range(num_q_blocks):
        generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, row])))
        table[row] = np.sort(generator.choice(num_k_blocks, draws, replace=False))
    table.setflags(write=False)
    return table


# Most (query, key) pairs a Predicate evaluates at once while computing its layout: 4M pairs,
# a few tens of MB of temporaries, whatever the sequence length.
_PREDICATE_TILE = 1 << 22


@dataclasses.dataclass(frozen=True)
class Predicate(Pattern):
    """Any vectorised rule `fn(q_pos, k_pos) -> bool array` as a pattern, shown as `name`.

    `fn` takes integer arrays that broadcast against each other (`[n, 1]` and `[1, m]`) and
    returns a bool array of their broadcast shape (or one that broadcasts to it), like
    FlexAttention's mask_mod or splash attention's NumpyMask. Patterns compare and hash by `fn`'s
    identity and `name`, so a predicate is a static argument under `jax.jit` as long as the same
    function object is passed. Its block layout evaluates `fn` on every pair, one tile at a time.
    Decoding calls `fn` on traced jax positions, so a predicate written with operators only
    (`<=`, `%`, `&`, `|`) also decodes.
    """

    fn: object
    name: str

    def allows(self, q_pos, k_pos, q_len, kv_len):
        allowed = self.fn(q_pos, k_pos)
        # NumPy callers get a bool array; a jax bool array (decoding) is returned as it is.
        if getattr(allowed, "dtype", None) == np.dtype(bool):
            return allowed
        return np.asarray(allowed, bool)

    def _layout(self, q_blocks, k_blocks):
        layout = np.empty((q_blocks.count, k_blocks.count), np.int8)
        keys_per_tile = max(1, _PREDICATE_TILE // (q_blocks.size * k_blocks.size)) * k_blocks.size
        for row, (q_first, q_last) in enumerate(zip(q_blocks.first, q_blocks.last)):
            q_pos = np.arange(q_first, q_last + 1)[:, None]
            for start in range(0, k_blocks.length, keys_per_tile):
                k_pos = np.arange(start, min(start + keys_per_tile, k_blocks.length))[None, :]
                allowed = np.broadcast_to(
                    self.allows(q_pos, k_pos, q_blocks.length, k_blocks.length),
                    (len(q_pos), k_pos.shape[1]),
                )
                # Reduce over the queries, then over each key block's columns.
                starts = np.arange(0, k_pos.shape[1], k_blocks.size)
                some = np.logical_or.reduceat(allowed.any(0), starts)
                every = np.logical_and.reduceat(allowed.all(0), starts)
                first_block = start // k_blocks.size
                layout[row, first_block : first_block + len(starts)] = np.where(
                    every, FULL, np.where(some, PARTIAL, EMPTY)
                )
        return layout

    def __str__(self):
        return self.name


@dataclasses.dataclass(frozen=True)
class Union(Pattern):
    """A query may attend to a key if any of the parts allows it."""

    parts: tuple

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return functools.reduce(
            np.logical_or, [p.allows(q_pos, k_pos, q_len, kv_len) for p in self.parts]
        )

    def _layout(self, q_blocks, k_blocks):
        return functools.reduce(np.maximum, [p._layout(q_blocks, k_blocks) for p in self.parts])

    def __str__(self):
        return " | ".join(f"({p})" if isinstance(p, Intersection) else str(p) for p in self.parts)


@dataclasses.dataclass(frozen=True)
class Intersection(Pattern):
    """A query may attend to a key if every part allows it."""

    parts: tuple

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return functools.reduce(
            np.logical_and, [p.allows(q_pos, k_pos, q_len, kv_len) for p in self.parts]
        )

    def _layout(self, q_blocks, k_blocks):
        return functools.reduce(np.minimum, [p._layout(q_blocks, k_blocks) for p in self.parts])

    def __str__(self):
        return " & ".join(f"({p})" if isinstance(p, Union) else str(p) for p in self.parts)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def full():
    """Every query attends to every key."""
    return Full()


def causal():
    """Query i attends to keys j <= i."""
    return Causal()


def sliding_window(left, right=None):
    """Query i attends to keys i - left <= j <= i + right; `right` defaults to `left`.

    `sliding_window(w) & causal()` is causal local attention over the last w + 1 keys.
    """
    left = _check_int("sliding_window left", left, 0)
    right = left if right is None else _check_int("sliding_window right", right, 0)
    return SlidingWindow(left, right)


def anchor(num_anchors=None, *, positions=None):
    """Global tokens at positions 0..num_anchors-1, or at explicit `positions`.

    An anchor query attends to every key and every query attends to the anchor keys.
    """
    if (num_anchors is None) == (positions is None):
        raise ValueError("anchor() takes exactly one of num_anchors or positions.")
    if positions is None:
        positions = range(_check_int("num_anchors", num_anchors, 1))
    positions = tuple(sorted({_check_int("anchor position", p, 0) for p in positions}))
    if not positions:
        raise ValueError("anchor(positions=...) needs at least one position.")
    return Anchor(positions)


def random(num_blocks, block_size, seed=0):
    """Each block of `block_size` queries attends to `num_blocks` key blocks drawn from `seed`."""
    return RandomBlocks(
        _check_int("num_blocks", num_blocks, 1),
        _check_int("block_size", block_size, 1),
        _check_int("seed", seed, 0),
    )


def bigbird(block_size=64, window_blocks=3, num_anchor_blocks=2, num_random_blocks=3, seed=0):
    """BigBird's union (Zaheer et al., 2020) of sliding window, anchors and random blocks.

    The window reaches (window_blocks // 2) blocks to each side, so it spans `window_blocks`
    blocks of `block_size`; the first `num_anchor_blocks` blocks are global tokens; each query
    block also attends to `num_random_blocks` random key blocks.
    """
    block_size = _check_int("block_size", block_size, 1)
    window_blocks = _check_int("window_blocks", window_blocks, 1)
    if window_blocks % 2 == 0:
        raise ValueError(f"window_blocks must be odd (a centred window); got {window_blocks}.")
    parts = sliding_window(block_size * (window_blocks // 2))
    if num_anchor_blocks:
        parts = parts | anchor(_check_int("num_anchor_blocks", num_anchor_blocks, 0) * block_size)
    if num_random_blocks:
        parts = parts | random(num_random_blocks, block_size, seed)
    return parts


def strided(stride):
    """Query i attends to keys j with (i - j) % stride == 0 (Sparse Transformer's strided part).

    `strided(1)` allows every pair and is `full()`, which implementations recognise (chunked
    attention, "auto"). The Long Range Arena's "LocalAttention" with `num_blocks` blocks is
    `strided(num_blocks)`.
    """
    stride = _check_int("strided stride", stride, 1)
    return Full() if stride == 1 else Strided(stride)


def lra_local(block_size):
    """The Long Range Arena's "local" attention: `strided(num_blocks)` at LRA's padded length."""
    return LraLocal(_check_int("lra_local block_size", block_size, 1))


def prefix_lm(prefix_length):
    """Bidirectional among positions < prefix_length, causal after: j <= i or both < prefix_length.

    `prefix_lm(0)` is `causal()`, which implementations recognise (chunked attention skips its
    upper half). In a decoder it replaces the decoder's causal mask (see `PrefixLM`).
    """
    prefix_length = _check_int("prefix_lm prefix_length", prefix_length, 0)
    return Causal() if prefix_length == 0 else PrefixLM(prefix_length)


def predicate(fn, name):
    """A pattern from a vectorised NumPy rule `fn(q_pos, k_pos) -> bool array`; `str()` is `name`.

    >>> predicate(lambda i, j: (j <= i) & (i - j < 3), "causal_window(2)").mask(4, 4).astype(int)
    array([[1, 0, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 0],
           [0, 1, 1, 1]])
    """
    if not callable(fn):
        raise TypeError(f"predicate fn must be callable fn(q_pos, k_pos); got {type(fn).__name__}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"predicate name must be a non-empty string; got {name!r}.")
    return Predicate(fn, name)


PATTERNS = {
    "full": full,
    "causal": causal,
    "sliding_window": sliding_window,
    "anchor": anchor,
    "random": random,
    "bigbird": bigbird,
    "strided": strided,
    "lra_local": lra_local,
    "prefix_lm": prefix_lm,
}


def layer_seed(seed, layer):
    """A seed for `layer` derived from `seed`: different per layer, the same in every process."""
    return int(
        np.random.SeedSequence(
            [_check_int("seed", seed, 0), _check_int("layer", layer, 0)]
        ).generate_state(1)[0]
    )


def build(name, *, layer=0, **options):
    """The pattern registered as `name`, built with `options`; random parts reseeded per layer.

    >>> build("bigbird", layer=3, block_size=32)  # doctest: +ELLIPSIS
    Union(parts=(SlidingWindow(left=32, right=32), Anchor(...), RandomBlocks(...)))
    """
    if name not in PATTERNS:
        raise ValueError(f"unknown attention pattern {name!r}; allowed: {sorted(PATTERNS)}.")
    constructor = PATTERNS[name]
    parameters = inspect.signature(constructor).parameters
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ValueError(
            f"pattern {name!r} takes no option(s) {unknown}; allowed: {list(parameters)}."
        )
    missing = [
        n
        for n, p in parameters.items()
        if p.default is inspect.Parameter.empty and n not in options
    ]
    if missing:
        raise ValueError(
            f"pattern {name!r} needs option(s) {missing} (a model config sets them in pattern_options)."
        )
    if "seed" in parameters:
        options["seed"] = layer_seed(options.get("seed", 0), layer)
    return constructor(**options)


# What docs/patterns.md pictures: every named pattern, the compositions used most, and a
# predicate (a dilated causal window, which no named pattern gives).
EXAMPLES = {
    "full": full(),
    "causal": causal(),
    "sliding_window": sliding_window(8),
    "causal_sliding_window": sliding_window(8) & causal(),
    "anchor": anchor(8),
    "random": random(2, 8, seed=0),
    "bigbird": bigbird(block_size=8),
    "causal_bigbird": bigbird(block_size=8) & causal(),
    "strided": strided(8),
    "prefix_lm": prefix_lm(48),
    "predicate": predicate(
        lambda i, j: (j <= i) & (i - j < 32) & ((i - j) % 4 == 0),
        "(j <= i) & (i - j < 32) & ((i - j) % 4 == 0)",
    ),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw each attention pattern as a PNG.")
    parser.add_argument("--out", default="docs/patterns", help="folder for the PNG files")
    parser.add_argument("--length", type=int, default=128, help="query and key length")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, pattern in EXAMPLES.items():
        path = os.path.join(args.out, f"{name}.png")
        pattern.draw(args.length, path=path, title=f"{name}: {pattern}")
        print(path)


if __name__ == "__main__":
    main()
