"""Ring attention: context parallelism that skips what the pattern makes unnecessary.

Each device of a mesh axis (say "context") holds one shard of the sequence: its queries, keys,
values and key padding, `[batch, shard_len, heads, head_dim]`. `ring_attention`, called inside
`jax.shard_map` over that axis, computes exactly the attention of the whole sequence under a
pattern (`dot_product_attention(..., pattern=pattern)`), each device for its own queries: key and
value shards travel between the devices with `lax.ppermute`, and each device folds every shard
that reaches it into an online softmax (running max, sum and weighted values, as in
FlashAttention), so no device needs the keys of the whole sequence at once.

Pattern-aware. The plan (`plan_ring`, NumPy, static) reads the pattern's block layout at shard
granularity: which (query shard, key shard) pairs are non-empty. At ring step `offset`, device i
computes against the keys of device `(i - offset) % n`. An offset that no device needs is not a
step at all: no ppermute, no compute. A step where every device needs whole key shards is one
hop of the ring from the previous step's buffer (each link carries one shard); any other step is
sent straight from the owners' own shards to the devices that need it, only the key chunks each
receiver uses, and the others neither receive nor compute. A sliding window narrower than a shard needs
offsets 0, +1 and -1 only, and from each neighbour only the chunk next to it: what a device
sends depends on the window, not on the sequence or the number of devices. BigBird adds the
anchor shards (which every device receives) and its random blocks' shards. Inside a pair, work
is skipped by chunks of queries and keys (`chunk`, 64 or 128 by default, whichever the plan
finds cheaper): only the (query chunk, key chunk) products with an allowed pair are computed,
each densely under its exact mask (the pattern's distinct partial blocks, stored once).

Causal load balancing. Under a causal mask a contiguous split gives device 0 one pair of work
and device n-1 n pairs. The zig-zag order splits the sequence into 2n chunks and gives device i
chunks i and 2n-1-i, so every device computes the same number of chunk products
(`zigzag_permutation`, `to_zigzag`, `from_zigzag`; the plan's masks and ALiBi distances follow
the real positions).

Exact, forward and backward: a `jax.custom_vjp` whose backward walks the same steps again; the
gradients of each visiting key shard accumulate in buffers that travel with it and go home to its
owner when the walk leaves it (one more ppermute). The forward saves only the device's own q, k,
v, output and log-sum-exp, never the visiting shards. A query with no allowed key gets zeros and
zero gradients. Non-finite inputs follow the dense reference (`dense.py`): padded keys and values
are zeroed, excluded logits are selected (never added) to -inf, and the products run over the
allowed pairs only (`dense.masked_einsum`), so what the mask excludes never reaches the results
and what it allows propagates (NaN in, NaN out); a NaN row maximum is not "no key".

Variants, as in the other implementations: grouped-query heads (key and value with kv_heads
dividing heads; only kv_heads travel, never repeated), logit soft-capping, attention sinks
(added to each row's normaliser at the end; their gradient summed over the devices) and packed
documents (segment ids that travel with their key shard; a chunk product whose query and key
documents cannot meet is skipped at run time).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from transformer import patterns
from transformer.attention.dense import all_finite, masked_einsum
from transformer.attention.shapes import check_query_key_value, varying_like
from transformer.attention.sinks import check_sinks
from transformer.attention.soft_cap import check_logit_soft_cap, soft_cap_with_slope

ORDERS = ("contiguous", "zigzag")
# Inside a pair, work is skipped by chunks of queries and keys; one chunk product's scores,
# [batch, heads, chunk, chunk], are what a step holds at a time. The default chunk is the one of
# these sizes (or the largest divisor of the shard below it) that costs least by
# `_chunk_cost`. On CPU, products of 256 cost more per score than smaller ones, and a sparse
# pattern wastes less in small ones: BigBird (blocks of 64) at 16K tokens ran its forward and
# backward 10x faster in chunks of 64 than of 256, causal attention 1.4x faster in 128.
_CHUNKS = (128, 64)
# A chunk product's fixed cost (loop step, slicing, mask), in scores: fitted to the causal runs.
_CHUNK_OVERHEAD = 2048
# The pair masks are stored as the distinct masks of blocks of at most this size.
_MAX_BLOCK = 128


# ---------------------------------------------------------------------------------------------
# Token orders.


def _check_shards(length, num_shards, order):
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}.")
    for name, value in (("length", length), ("num_shards", num_shards)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    chunks = 2 * num_shards if order == "zigzag" else num_shards
    if length % chunks:
        what = f"2 x {num_shards} zig-zag chunks" if order == "zigzag" else f"{num_shards} shards"
        raise ValueError(
            f"sequence length {length} does not divide into {what}; pad it to a multiple of "
            f"{chunks} (e.g. {-(-length // chunks) * chunks}) and mark the padding in key_valid."
        )


def zigzag_permutation(length, num_shards):
    """`[length]` int: the token order whose consecutive shards are the zig-zag shards.

    The sequence is cut into 2n chunks; shard i is chunk i followed by chunk 2n-1-i. Reorder with
    `x[:, perm]` (`to_zigzag`) before sharding and back with `from_zigzag`.
    """
    _check_shards(length, num_shards, "zigzag")
    chunks = np.arange(length).reshape(2 * num_shards, -1)
    return np.concatenate(
        [np.concatenate([chunks[i], chunks[2 * num_shards - 1 - i]]) for i in range(num_shards)]
    )


def to_zigzag(x, num_shards, axis=1):
    """`x` with its `axis` (the sequence) in zig-zag order for `num_shards` shards."""
    return jnp.take(x, zigzag_permutation(x.shape[axis], num_shards), axis=axis)


def from_zigzag(x, num_shards, axis=1):
    """Inverse of `to_zigzag`: the sequence back in its natural order."""
    return jnp.take(x, np.argsort(zigzag_permutation(x.shape[axis], num_shards)), axis=axis)


def shard_positions(length, num_shards, order="contiguous"):
    """`[num_shards, length // num_shards]` int: the sequence position of each shard's tokens."""
    _check_shards(length, num_shards, order)
    if order == "zigzag":
        return zigzag_permutation(length, num_shards).reshape(num_shards, -1)
    return np.arange(length).reshape(num_shards, -1)


# ---------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class RingStep:
    """One ring step: device i computes its queries against the keys of device (i - offset) % n.

    The keys arrive by one ppermute, `perm` ((sender, receiver) device pairs; empty: no
    communication), applied to the previous step's buffer (`source="carried"`, a whole ring hop
    of `shift` devices, in [-n/2, n/2]) or to the owners' own shards (`source="local"`, sent
    only to the devices that need them, and only the key chunks `sent` when that is fewer).
    Within the pair, device i walks `items[i, :counts[i]]`, the (query chunk, key chunk)
    products of `chunk` tokens each that its pair needs.
    """

    offset: int
    source: str
    shift: int
    perm: tuple  # ((sender, receiver), ...)
    home: tuple  # the perm that brings the visiting shards' gradients back to their owners
    items: np.ndarray  # [n, m, 3] int32 (query chunk, key chunk in buffer, in shard), padded
    counts: np.ndarray  # [n] int32
    mask_ids: np.ndarray  # [n, nb, nb] int32: each device's pair mask, as ids of block masks
    # A direct step sends only the key chunks its receiver uses: sender j sends its chunks
    # sent[j] (None: whole shards).
    sent: object = None

    def sent_len(self, shard_len, chunk):
        """Tokens of keys each sender sends at this step (0 if none)."""
        if not self.perm:
            return 0
        return shard_len if self.sent is None else self.sent.shape[1] * chunk

    @property
    def computed_pairs(self):
        """Devices whose pair at this offset is non-empty."""
        return int((self.counts > 0).sum())


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: plans are cached
class RingPlan:
    """What a ring computes and sends, from the pattern alone (NumPy, static).

    Shards are in device order, whatever the token order. `pair_kind[i, j]` is EMPTY, PARTIAL
    or FULL for query shard i against key shard j; `chunk_kind[i, j, a, b]` the same for their
    chunks a and b of `chunk` tokens. `steps` are the offsets computed, in order;
    `skipped_offsets` those no device needs, whose exchange never happens. `block_masks` are
    the distinct exact masks of partial `[block, block]` blocks (id 0 all-allowed, 1 none).
    """

    pattern: object
    num_shards: int
    shard_len: int
    length: int  # the real sequence length the pattern is evaluated at
    order: str
    chunk: int
    block: int
    positions: np.ndarray  # [n, shard_len] sequence position of each token
    pair_kind: np.ndarray  # [n, n] int8
    chunk_kind: np.ndarray  # [n, n, chunks, chunks] int8
    steps: tuple
    skipped_offsets: tuple
    block_masks: np.ndarray  # [num_masks, block, block] bool

    @property
    def computed_pairs(self):
        return int((self.pair_kind != patterns.EMPTY).sum())

    @property
    def skipped_pairs(self):
        return self.num_shards**2 - self.computed_pairs

    @property
    def computed_chunks(self):
        """(query chunk, key chunk) products computed, over all devices."""
        return int((self.chunk_kind != patterns.EMPTY).sum())

    @property
    def total_chunks(self):
        return self.chunk_kind.size

    @property
    def exchanges(self):
        """Steps that communicate (one ppermute of keys and values each) in the forward pass."""
        return sum(bool(step.perm) for step in self.steps)

    def sends_per_device(self):
        """`[n]`: how many times each device sends keys (whole shards or chunks) forward."""
        sends = np.zeros(self.num_shards, int)
        for step in self.steps:
            for sender, _ in step.perm:
                sends[sender] += 1
        return sends

    def chunks_per_device(self):
        """`[n]`: chunk products each device computes (its load)."""
        return (self.chunk_kind != patterns.EMPTY).sum(axis=(1, 2, 3))

    def _token_bytes(self, batch, heads, head_dim, value_dim, itemsize, key_padding):
        """Bytes per token of the keys and values sent, and of their float32 gradients. `heads`
        are the key/value heads (fewer than the query's under grouped-query attention); what
        travels with the keys besides: "padding" (bool key_valid) and/or "segments" (int32
        segment ids) in `key_padding`, or True for the padding alone."""
        value_dim = head_dim if value_dim is None else value_dim
        keys = batch * heads * (head_dim + value_dim)
        extras = {True: ("padding",), False: ()}.get(key_padding, key_padding)
        extra = batch * (("padding" in extras) + 4 * ("segments" in extras))
        return keys * itemsize + extra, keys * 4

    def _sent(self, step):
        return step.sent_len(self.shard_len, self.chunk)

    def bytes_per_step(self, batch, heads, head_dim, value_dim=None, itemsize=4, key_padding=False):
        """Bytes one device sends at each step of the forward pass, at most (a device sends to
        one device or none per step): its keys and values, and its key padding when given."""
        token, _ = self._token_bytes(batch, heads, head_dim, value_dim, itemsize, key_padding)
        return tuple(token * self._sent(step) for step in self.steps)

    def bytes_per_device(
        self, batch, heads, head_dim, value_dim=None, itemsize=4, key_padding=False
    ):
        """`[n]`: bytes each device sends in the forward pass."""
        token, _ = self._token_bytes(batch, heads, head_dim, value_dim, itemsize, key_padding)
        sent = np.zeros(self.num_shards, np.int64)
        for step in self.steps:
            for sender, _ in step.perm:
                sent[sender] += token * self._sent(step)
        return sent

    def total_bytes(self, batch, heads, head_dim, value_dim=None, itemsize=4, key_padding=False):
        """(forward, backward) bytes sent by all devices together. The backward pass sends the
        keys again, the float32 gradient accumulators that travel with them, and the
        accumulators' trips home."""
        token, gradient = self._token_bytes(
            batch, heads, head_dim, value_dim, itemsize, key_padding
        )
        forward = token * sum(len(step.perm) * self._sent(step) for step in self.steps)
        travelling = sum(
            len(step.perm) * self._sent(step) for step in self.steps if step.source == "carried"
        )
        home = sum(len(step.home) * self._sent(step) for step in _trips_home(self.steps))
        return forward, forward + gradient * (travelling + home)

    def describe(self):
        """A few lines of text: what is computed and sent, step by step."""
        n = self.num_shards
        lines = [
            f"ring plan: {self.pattern} over {n} shards of {self.shard_len} "
            f"({self.order}, real length {self.length}, chunks of {self.chunk})",
            f"  shard pairs computed {self.computed_pairs} of {n * n}; chunk products "
            f"{self.computed_chunks} of {self.total_chunks}, per device "
            f"{self.chunks_per_device().tolist()}",
            f"  offsets skipped (no exchange, no compute): {list(self.skipped_offsets)}",
        ]
        for step in self.steps:
            lines.append(
                f"  offset {step.offset}: {step.source}, shift {step.shift:+d}, "
                f"{len(step.perm)} devices send {self._sent(step)} tokens, "
                f"{step.computed_pairs} devices compute "
                f"{int(step.counts.sum())} chunk products"
            )
        return "\n".join(lines)


def _trips_home(steps):
    """The steps whose travelling gradient accumulators go home in the backward pass: when the
    walk leaves their buffer for the devices' own shards, and at the end."""
    return [
        step
        for step, following in zip(steps, steps[1:] + (None,))
        if step.home and (following is None or following.source == "local")
    ]


def _key_chunks_sent(items, counts, sources, chunks):
    """`[n, m]` key chunks each device sends at a direct step (those its receiver's products
    use, padded with chunk 0), or None when some receiver needs them all; renumbers `items`'
    buffer column to positions in what is sent."""
    n = len(counts)
    needed = [np.unique(items[i, : counts[i], 2]) for i in range(n)]
    width = max(len(chunks_used) for chunks_used in needed)
    if width == chunks:
        return None
    sent = np.zeros((n, width), np.int32)
    for receiver, chunks_used in enumerate(needed):
        sent[sources[receiver], : len(chunks_used)] = chunks_used
        items[receiver, : counts[receiver], 1] = np.searchsorted(
            chunks_used, items[receiver, : counts[receiver], 2]
        )
    return sent


def _chunk_cost(plan):
    """What a plan's chunk products cost, in scores computed plus a fixed cost per product."""
    return plan.computed_chunks * (plan.chunk**2 + _CHUNK_OVERHEAD)


def _largest_divisor(length, at_most):
    return max(d for d in range(1, min(length, at_most) + 1) if length % d == 0)


def _signed(shift, n):
    """`shift` mod n as the signed shift of fewest hops, in [-n/2, n/2]."""
    shift %= n
    return shift - n if shift > n // 2 else shift


def _kind(ids, axes):
    """EMPTY/PARTIAL/FULL of groups of block mask ids (0 full, 1 empty) reduced over `axes`."""
    full = (ids == 0).all(axes)
    empty = (ids == 1).all(axes)
    return np.where(full, patterns.FULL, np.where(empty, patterns.EMPTY, patterns.PARTIAL)).astype(
        np.int8
    )


@functools.lru_cache(maxsize=32)
def plan_ring(pattern, num_shards, shard_len, length=None, order="contiguous", chunk=None):
    """The `RingPlan` of `pattern` over `num_shards` shards of `shard_len` tokens.

    `length` is the real sequence length (default num_shards * shard_len): keys at positions
    past it are excluded and queries past it get zeros, and the pattern is evaluated at that
    length (a random pattern's draw depends on it). `chunk` is the granularity at which the work
    inside a pair is skipped; it must divide the shard (or its zig-zag half). By default it is
    the candidate (`_CHUNKS`, each cut to a divisor of the shard) whose plan costs least:
    chunk products computed x (chunk^2 + a fixed cost per product).
    """
    if chunk is None:
        base = shard_len // 2 if order == "zigzag" else shard_len
        candidates = sorted({_largest_divisor(base, size) for size in _CHUNKS})
        plans = [
            plan_ring(pattern, num_shards, shard_len, length, order, int(c)) for c in candidates
        ]
        return min(plans, key=_chunk_cost)
    if not isinstance(pattern, patterns.Pattern):
        raise TypeError(f"pattern must be a transformer.patterns pattern; got {pattern!r}.")
    total = num_shards * shard_len
    _check_shards(total, num_shards, order)
    length = total if length is None else length
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise ValueError(f"length must be an integer; got {length!r}.")
    if not 1 <= length <= total:
        raise ValueError(
            f"length {length} must be in [1, {total}] ({num_shards} shards of {shard_len})."
        )
    base = shard_len // 2 if order == "zigzag" else shard_len
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or base % chunk:
        raise ValueError(
            f"chunk must divide the {'zig-zag half ' if order == 'zigzag' else ''}shard of "
            f"{base} tokens; got {chunk!r}."
        )
    block = _largest_divisor(chunk, _MAX_BLOCK)
    positions = shard_positions(total, num_shards, order)
    # The pattern's layout at block granularity covers the real length; blocks past it are empty.
    real = pattern.block_layout(length, length, block)
    num_blocks = total // block
    layout = np.full((num_blocks, num_blocks), patterns.EMPTY, np.int8)
    layout[: real.shape[0], : real.shape[1]] = real
    shard_blocks = positions[:, ::block] // block  # [n, nb] sequence block of each shard block
    # [n, n, nb, nb]: query shard, key shard, their blocks; as mask ids (0 full, 1 empty).
    pair_blocks = layout[shard_blocks[:, None, :, None], shard_blocks[None, :, None, :]]
    ids = np.where(pair_blocks == patterns.FULL, 0, 1).astype(np.int32)
    partial = np.argwhere(pair_blocks == patterns.PARTIAL)
    masks = [np.ones((block, block), bool), np.zeros((block, block), bool)]
    if len(partial):
        q_first = shard_blocks[partial[:, 0], partial[:, 2]] * block
        k_first = shard_blocks[partial[:, 1], partial[:, 3]] * block
        q_pos = q_first[:, None, None] + np.arange(block)[None, :, None]
        k_pos = k_first[:, None, None] + np.arange(block)[None, None, :]
        exact = pattern.allows(
            np.minimum(q_pos, length - 1), np.minimum(k_pos, length - 1), length, length
        )
        exact = np.broadcast_to(exact, (len(partial), block, block))
        exact = exact & (q_pos < length) & (k_pos < length)
        unique, inverse = np.unique(exact.reshape(len(exact), -1), axis=0, return_inverse=True)
        masks.extend(unique.reshape(-1, block, block))
        # A block the layout called partial may be exactly full or exactly empty.
        mask_id = np.where(
            unique.all(1), 0, np.where(~unique.any(1), 1, 2 + np.arange(len(unique)))
        )
        ids[tuple(partial.T)] = mask_id[inverse.reshape(-1)]
    n, per_chunk = num_shards, chunk // block
    chunks = shard_len // chunk
    chunk_ids = ids.reshape(n, n, chunks, per_chunk, chunks, per_chunk)
    chunk_kind = _kind(chunk_ids, (3, 5))  # [n, n, chunks, chunks]
    pair_kind = _kind(chunk_ids, (2, 3, 4, 5))

    devices = np.arange(n)
    steps, needed, current, whole = [], [], 0, True
    for offset in range(n):
        sources = (devices - offset) % n
        flags = (chunk_kind[devices, sources] != patterns.EMPTY).reshape(n, -1)  # [n, c * c]
        if not flags.any():
            continue
        needed.append(offset)
        counts = flags.sum(1).astype(np.int32)
        # Columns: query chunk, key chunk in the received buffer, key chunk in its shard.
        items = np.zeros((n, counts.max(), 3), np.int32)
        for i in devices:
            used = np.flatnonzero(flags[i])
            items[i, : len(used)] = np.stack([used // chunks, used % chunks, used % chunks], 1)
        receivers = devices if offset == 0 else np.flatnonzero(flags.any(1))
        carried, local = _signed(offset - current, n), _signed(offset, n)
        # Sending only the key chunks a receiver uses beats a whole hop whenever it is fewer.
        direct_items = items.copy()
        sent = _key_chunks_sent(direct_items, counts, sources, chunks) if offset else None
        if sent is None and len(receivers) == n and whole and abs(carried) <= abs(local):
            # A whole hop from the previous buffer: each link carries one shard, as in a ring.
            source, shift = "carried", carried
            perm = tuple((int(j), int((j + shift) % n)) for j in devices) if shift else ()
            home = tuple((int(i), int(sources[i])) for i in devices) if offset else ()
        else:
            source, shift, items = "local", local, direct_items
            perm = tuple((int(sources[i]), int(i)) for i in receivers if offset)
            home = tuple((receiver, sender) for sender, receiver in perm)
        steps.append(
            RingStep(offset, source, shift, perm, home, items, counts, ids[devices, sources], sent)
        )
        current, whole = offset, len(receivers) == n and sent is None
    return RingPlan(
        pattern=pattern,
        num_shards=n,
        shard_len=shard_len,
        length=int(length),
        order=order,
        chunk=chunk,
        block=block,
        positions=positions,
        pair_kind=pair_kind,
        chunk_kind=chunk_kind,
        steps=tuple(steps),
        skipped_offsets=tuple(d for d in range(n) if d not in needed),
        block_masks=np.stack(masks),
    )


# ---------------------------------------------------------------------------------------------
# The ring.


def ring_attention(
    query,
    key,
    value,
    *,
    pattern=None,
    axis_name="context",
    key_valid=None,
    segment_ids=None,
    scale=None,
    alibi_slopes=None,
    logit_soft_cap=None,
    sinks=None,
    length=None,
    order="contiguous",
    chunk=None,
):
    """This device's share of `dot_product_attention(..., pattern=pattern)` over the whole sequence.

    Call inside `jax.shard_map` with the sequence split over `axis_name`, every device holding
    one shard (in zig-zag order when `order="zigzag"`: see `to_zigzag`).

    Args:
      query: `[batch, shard_len, heads, head_dim]`, this device's queries.
      key: `[batch, shard_len, kv_heads, head_dim]`, this device's keys; kv_heads divides heads
        (grouped-query attention: query head n reads key/value head n // (heads // kv_heads);
        the keys are never repeated, and only kv_heads travel around the ring).
      value: `[batch, shard_len, kv_heads, value_dim]`.
      pattern: a `transformer.patterns` pattern, a name in `patterns.PATTERNS`, or None (full).
      axis_name: the mesh axis the sequence is split over.
      key_valid: bool `[batch, shard_len]`, False at padded keys, or None.
      segment_ids: int `[batch, shard_len]`, the document of each of this device's tokens
        (packed documents), or None. A query sees a key only when their ids are equal; the key
        shard's ids travel with it, and a chunk product whose query and key ids do not overlap
        (as intervals) is skipped at run time.
      scale: multiplies the logits; defaults to 1/sqrt(head_dim).
      alibi_slopes: `[heads]`; adds -slope * |i - j| at the real positions. Constants: no
        gradient flows to them.
      logit_soft_cap: None or a float c > 0: each scaled score s becomes c * tanh(s / c), before
        ALiBi and the mask (`soft_cap.py`).
      sinks: None or float `[heads]` sink logits, in every row's softmax denominator with a zero
        value (`sinks.py`); differentiable, their gradient summed over the devices.
      length: the real sequence length, default num_shards * shard_len; positions past it are
        padding (keys excluded, queries get zeros) and the pattern is evaluated at it.
      order: "contiguous" (device i holds positions [i * shard_len, (i + 1) * shard_len)) or
        "zigzag".
      chunk: the granularity at which work inside a pair is skipped (`plan_ring`).

    Returns:
      `[batch, shard_len, heads, value_dim]`: this device's rows of the output, zeros for a query
      with no allowed key.
    """
    check_query_key_value(query, key, value)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"ring attention is self-attention over one sharded sequence: query shard length "
            f"{query.shape[1]} != key shard length {key.shape[1]}."
        )
    if pattern is None:
        pattern = patterns.full()
    elif isinstance(pattern, str):
        pattern = patterns.build(pattern)
    try:
        num_shards = lax.axis_size(axis_name)
    except NameError as error:
        raise ValueError(
            f"ring_attention found no mesh axis {axis_name!r}: call it inside jax.shard_map over "
            f"a mesh with that axis ({error})."
        ) from None
    batch, shard_len, heads, _ = query.shape
    for name, array in (("key_valid", key_valid), ("segment_ids", segment_ids)):
        if array is not None and tuple(jnp.shape(array)) != (batch, shard_len):
            raise ValueError(
                f"{name} must be [batch, shard_len] = [{batch}, {shard_len}] (this device's "
                f"tokens); got shape {tuple(jnp.shape(array))}."
            )
    if segment_ids is not None and not jnp.issubdtype(jnp.asarray(segment_ids).dtype, jnp.integer):
        raise TypeError(f"segment_ids must be integers; got {jnp.asarray(segment_ids).dtype}.")
    if alibi_slopes is not None and np.shape(alibi_slopes) != (heads,):
        raise ValueError(
            f"alibi_slopes must have shape [heads] = ({heads},); got {np.shape(alibi_slopes)}."
        )
    check_sinks(sinks, heads)
    config = _Config(
        scale=float(query.shape[-1] ** -0.5 if scale is None else scale),
        soft_cap=check_logit_soft_cap(logit_soft_cap),
    )
    plan = plan_ring(pattern, num_shards, shard_len, length, order, chunk)
    if key_valid is not None:
        # Padded keys and values become zeros: nothing there can reach a product.
        valid = key_valid[:, :, None, None]
        key, value = jnp.where(valid, key, 0), jnp.where(valid, value, 0)
        key_valid = key_valid.astype(bool)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
    if sinks is not None:
        # Trainable and the same on every device: varying here, so that the custom VJP's
        # per-device gradient is summed over the devices when it leaves.
        (sinks,) = varying_like((query, key, value), jnp.asarray(sinks, jnp.float32))
    return _ring(plan, config, axis_name, query, key, value, key_valid, segment_ids, slopes, sinks)


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static numbers of a ring's logits."""

    scale: float
    soft_cap: float | None


def _send(tree, perm, axis_name):
    """`tree` moved along `perm` ((sender, receiver) pairs); devices receiving nothing get zeros."""
    if not perm:
        return tree
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _slice(x, chunk, index, axis):
    return lax.dynamic_slice_in_dim(x, index * chunk, chunk, axis)


def _update(x, update, chunk, index, axis):
    return lax.dynamic_update_slice_in_dim(x, update, index * chunk, axis)


def _grouped(x, kv_heads):
    """`[batch, heads, ...]` -> `[batch, kv_heads, group, ...]`: query head n is
    (n // group, n % group), the group of key/value head n // group."""
    return x.reshape(x.shape[0], kv_heads, -1, *x.shape[2:])


def _ungrouped(x):
    """Inverse of `_grouped`."""
    return x.reshape(x.shape[0], -1, *x.shape[3:])


class _Chunk:
    """What one (query chunk, key chunk) product of a step needs: its logits and its mask.

    The query chunk is `[batch, chunk, heads, d]`, the key chunk `[batch, chunk, kv_heads, d]`;
    logits and weights are `[batch, heads, chunk, chunk]`, grouped to
    `[batch, kv_heads, group, chunk, chunk]` only for the products with keys and values.
    """

    def __init__(self, plan, config, step, device, slopes, q_ids):
        self.plan, self.config, self.step, self.device = plan, config, step, device
        self.slopes, self.q_ids = slopes, q_ids
        self.ids = jnp.asarray(step.mask_ids)[device]  # [nb, nb]
        self.positions = jnp.asarray(plan.positions)

    def mask(self, q_chunk, k_chunk, k_at, valid, k_ids):
        """`[batch or 1, 1, chunk, chunk]` bool: the exact mask of the product, padding and
        documents included. `k_chunk` indexes the received buffer, `k_at` the chunk's place in
        its shard."""
        plan = self.plan
        per_chunk = plan.chunk // plan.block
        ids = lax.dynamic_slice(
            self.ids, (q_chunk * per_chunk, k_at * per_chunk), (per_chunk, per_chunk)
        )
        blocks = jnp.asarray(plan.block_masks)[ids]  # [per_chunk, per_chunk, block, block]
        mask = blocks.transpose(0, 2, 1, 3).reshape(plan.chunk, plan.chunk)[None, None]
        if valid is not None:
            mask = mask & _slice(valid, plan.chunk, k_chunk, 1)[:, None, None, :]
        if k_ids is not None:
            q_ids = _slice(self.q_ids, plan.chunk, q_chunk, 1)[:, None, :, None]
            mask = mask & (q_ids == _slice(k_ids, plan.chunk, k_chunk, 1)[:, None, None, :])
        return mask

    def documents_meet(self, q_chunk, k_chunk, k_ids):
        """Whether some query and key of the product may share a document (their id ranges
        overlap in some batch row); False means the product is all masked."""
        q_ids = _slice(self.q_ids, self.plan.chunk, q_chunk, 1)
        k_ids = _slice(k_ids, self.plan.chunk, k_chunk, 1)
        overlap = (q_ids.min(1) <= k_ids.max(1)) & (k_ids.min(1) <= q_ids.max(1))
        return overlap.any()

    def logits(self, q_chunk, k_chunk, k_at, q_scaled, key):
        """`[batch, heads, chunk, chunk]` float32 logits of the product (soft-capped, ALiBi
        included), and the cap's slope (None without a cap)."""
        plan = self.plan
        q = _slice(q_scaled, plan.chunk, q_chunk, 1)
        k = _slice(key, plan.chunk, k_chunk, 1).astype(q.dtype)
        kv_heads = k.shape[2]
        q = q.reshape(*q.shape[:2], kv_heads, -1, q.shape[-1])  # [batch, chunk, kv_heads, group, d]
        logits = _ungrouped(jnp.einsum("bqhgd,bkhd->bhgqk", q, k))
        logits, slope = soft_cap_with_slope(logits, self.config.soft_cap)
        if self.slopes is not None:
            source = (self.device - self.step.offset) % plan.num_shards
            q_pos = _slice(self.positions[self.device], plan.chunk, q_chunk, 0)
            k_pos = _slice(self.positions[source], plan.chunk, k_at, 0)
            distance = jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(logits.dtype)
            logits = logits - self.slopes.astype(logits.dtype)[None, :, None, None] * distance
        return logits, slope


def _walk(step, device, carry, compute, pair=None, k_ids=None):
    """Runs `compute(carry, query chunk, key chunk in the buffer, key chunk in its shard)` over
    the chunk products this device needs; with segment ids, a product whose documents cannot
    meet leaves the carry as it is."""
    items = jnp.asarray(step.items)[device]

    def body(t, carry):
        q_chunk, k_chunk, k_at = items[t, 0], items[t, 1], items[t, 2]
        if k_ids is None:
            return compute(carry, q_chunk, k_chunk, k_at)
        return lax.cond(
            pair.documents_meet(q_chunk, k_chunk, k_ids),
            lambda carry: compute(carry, q_chunk, k_chunk, k_at),
            lambda carry: carry,
            carry,
        )

    # Each device loops over its own products only: a device whose pair is empty does nothing.
    return lax.fori_loop(0, jnp.asarray(step.counts)[device], body, carry)


def _product_over_allowed_pairs(axis_name, *inputs):
    """`product(spec, weights, allowed, operand)`: `einsum(spec, weights, operand)` over the
    allowed pairs only, for weights that are 0 at excluded pairs. Plain when every device's
    `inputs` are finite (then 0 * operand = 0); `masked_einsum` otherwise, so that an excluded
    NaN or inf stays out. One check per call, not one per chunk product, whose cost small
    products (BigBird's chunks of 64) would feel."""
    finite = lax.pmin(all_finite(*inputs).astype(jnp.int32), axis_name) > 0

    def product(spec, weights, allowed, operand):
        return lax.cond(
            finite,
            lambda: jnp.einsum(spec, weights, operand),
            lambda: masked_einsum(spec, weights, allowed, operand),
        )

    return product


def _with_sinks(row_max, row_sum, sinks):
    """Each row's log-sum-exp `[batch, heads, shard_len]`, sinks included, -inf for a row with
    no allowed key or only -inf logits (which keeps zeros: nothing of its sink is added). Not
    row_sum > 0: a NaN row (NaN or +inf logits) has keys and gives NaN."""
    has_key = ~jnp.isneginf(row_max)
    lse = row_max + jnp.log(jnp.where(has_key, row_sum, 1.0))
    if sinks is not None:
        lse = jnp.logaddexp(lse, sinks.astype(lse.dtype)[None, :, None])
    return jnp.where(has_key, lse, -jnp.inf)


def _ring_forward(plan, config, axis_name, query, key, value, key_valid, segments, slopes, sinks):
    """Output `[batch, shard_len, heads, value_dim]` and log-sum-exp `[batch, heads, shard_len]`."""
    chunk = plan.chunk
    device = lax.axis_index(axis_name)
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q_scaled = query.astype(dtype) * config.scale
    batch, shard_len, heads, _ = query.shape
    kv_heads = key.shape[2]
    product = _product_over_allowed_pairs(axis_name, query, key, value)
    carry = varying_like(
        (query, key, value),
        jnp.full((batch, heads, shard_len), -jnp.inf, dtype),  # running max
        jnp.zeros((batch, heads, shard_len), dtype),  # running sum of exp(logit - max)
        jnp.zeros((batch, heads, shard_len, value.shape[-1]), dtype),  # weighted values
    )
    local = (key, value, key_valid, segments)
    buffer = local
    for step in plan.steps:
        payload = _payload(step, local, device, chunk) if step.source == "local" else buffer
        buffer = _send(payload, step.perm, axis_name)
        k, v, valid, k_ids = buffer
        pair = _Chunk(plan, config, step, device, slopes, segments)

        def compute(carry, q_chunk, k_chunk, k_at, k=k, v=v, valid=valid, k_ids=k_ids, pair=pair):
            row_max, row_sum, acc = (_slice(x, chunk, q_chunk, 2) for x in carry)
            mask = pair.mask(q_chunk, k_chunk, k_at, valid, k_ids)
            logits, _ = pair.logits(q_chunk, k_chunk, k_at, q_scaled, k)
            logits = jnp.where(mask, logits, -jnp.inf)
            new_max = jnp.maximum(row_max, logits.max(-1))
            # A row with no allowed key so far keeps max -inf: shift it by 0, not by -inf. A NaN
            # or +inf maximum stays, so that exp() gives the row NaN, as in the reference.
            shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
            p = jnp.where(mask, jnp.exp(logits - shift[..., None]), 0.0)
            correction = jnp.exp(row_max - shift)
            row_sum = row_sum * correction + p.sum(-1)
            v_chunk = _slice(v, chunk, k_chunk, 1).astype(dtype)
            weighted = product(
                "bhgqk,bkhd->bhgqd", _grouped(p, kv_heads), mask[:, :, None], v_chunk
            )
            acc = acc * correction[..., None] + _ungrouped(weighted)
            return tuple(
                _update(x, u, chunk, q_chunk, 2) for x, u in zip(carry, (new_max, row_sum, acc))
            )

        carry = _walk(step, device, carry, compute, pair, k_ids)
    row_max, row_sum, acc = carry
    lse = _with_sinks(row_max, row_sum, sinks)
    # acc holds sum exp(s - row_max) v: divided by exp(lse - row_max), the sinks' share included.
    keep = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(row_max - lse))
    out = acc * keep[..., None]
    return out.transpose(0, 2, 1, 3).astype(query.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(plan, config, axis_name, query, key, value, key_valid, segments, slopes, sinks):
    return _ring_forward(
        plan, config, axis_name, query, key, value, key_valid, segments, slopes, sinks
    )[0]


def _ring_fwd(plan, config, axis_name, query, key, value, key_valid, segments, slopes, sinks):
    out, lse = _ring_forward(
        plan, config, axis_name, query, key, value, key_valid, segments, slopes, sinks
    )
    return out, (query, key, value, key_valid, segments, slopes, sinks, out, lse)


def _ring_bwd(plan, config, axis_name, residuals, d_out):
    """The forward's steps again; each visiting key shard's gradients travel with it and go
    home to its owner when the walk leaves it (FlashAttention's backward, pair by pair)."""
    query, key, value, key_valid, segments, slopes, sinks, out, lse = residuals
    chunk = plan.chunk
    device = lax.axis_index(axis_name)
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(dtype)
    q_scaled = q * config.scale
    kv_heads = key.shape[2]
    d_out_t = d_out.astype(dtype).transpose(0, 2, 1, 3)  # [batch, heads, shard_len, value_dim]
    delta = (d_out_t * out.astype(dtype).transpose(0, 2, 1, 3)).sum(-1)
    product = _product_over_allowed_pairs(axis_name, query, key, value, d_out)
    d_query, d_key, d_value = varying_like(
        (query, key, value, d_out),
        jnp.zeros(query.shape, dtype),
        jnp.zeros(key.shape, dtype),
        jnp.zeros(value.shape, dtype),
    )
    home = travelling = (d_key, d_value)  # gradients at the owner, and those travelling
    local = (key, value, key_valid, segments)
    buffer, previous = local, None
    for step in plan.steps:
        if step.source == "local":
            if previous is not None:
                home = _go_home(home, travelling, previous, device, chunk, axis_name)
            buffer = _send(_payload(step, local, device, chunk), step.perm, axis_name)
            travelling = varying_like(
                (query, key, value),
                jnp.zeros(buffer[0].shape, dtype),
                jnp.zeros(buffer[1].shape, dtype),
            )
        else:
            buffer, travelling = _send((buffer, travelling), step.perm, axis_name)
        previous = step
        k, v, valid, k_ids = buffer
        pair = _Chunk(plan, config, step, device, slopes, segments)

        def compute(carry, q_chunk, k_chunk, k_at, k=k, v=v, valid=valid, k_ids=k_ids, pair=pair):
            d_query, d_key, d_value = carry
            mask = pair.mask(q_chunk, k_chunk, k_at, valid, k_ids)
            logits, slope = pair.logits(q_chunk, k_chunk, k_at, q_scaled, k)
            lse_chunk = _slice(lse, chunk, q_chunk, 2)
            # Rows with no allowed key (lse -inf) have weight 0 everywhere; a NaN row's weights
            # are NaN, as in the reference.
            has_key = ~jnp.isneginf(lse_chunk)
            allowed = mask & has_key[..., None]  # [batch, heads, chunk, chunk]
            allowed_grouped = _grouped(allowed, kv_heads)
            shift = jnp.where(has_key, lse_chunk, 0.0)
            p = jnp.where(allowed, jnp.exp(jnp.where(allowed, logits, 0.0) - shift[..., None]), 0.0)
            d_out_chunk = _grouped(_slice(d_out_t, chunk, q_chunk, 2), kv_heads)
            k_chunk_values = _slice(k, chunk, k_chunk, 1).astype(dtype)
            v_chunk = _slice(v, chunk, k_chunk, 1).astype(dtype)
            p_grouped = _grouped(p, kv_heads)
            d_v = product("bhgqk,bhgqd->bkhd", p_grouped, allowed_grouped, d_out_chunk)
            d_p = _ungrouped(jnp.einsum("bhgqd,bkhd->bhgqk", d_out_chunk, v_chunk))
            d_logits = p * (d_p - _slice(delta, chunk, q_chunk, 2)[..., None]) * config.scale
            if slope is not None:
                d_logits = d_logits * slope
            # Over the allowed pairs only: an excluded NaN value makes d_p NaN there.
            d_logits = _grouped(jnp.where(allowed, d_logits, 0.0), kv_heads)
            q_chunk_values = _slice(q, chunk, q_chunk, 1)
            q_chunk_values = q_chunk_values.reshape(
                *q_chunk_values.shape[:2], kv_heads, -1, q.shape[-1]
            )
            d_q = product("bhgqk,bkhd->bqhgd", d_logits, allowed_grouped, k_chunk_values).reshape(
                *q_chunk_values.shape[:2], -1, q.shape[-1]
            )
            d_k = product("bhgqk,bqhgd->bkhd", d_logits, allowed_grouped, q_chunk_values)
            return (
                _update(d_query, _slice(d_query, chunk, q_chunk, 1) + d_q, chunk, q_chunk, 1),
                _update(d_key, _slice(d_key, chunk, k_chunk, 1) + d_k, chunk, k_chunk, 1),
                _update(d_value, _slice(d_value, chunk, k_chunk, 1) + d_v, chunk, k_chunk, 1),
            )

        d_query, *travelling = _walk(step, device, (d_query, *travelling), compute, pair, k_ids)
        travelling = tuple(travelling)
    if previous is not None:
        home = _go_home(home, travelling, previous, device, chunk, axis_name)
    d_key, d_value = home
    return (
        d_query.astype(query.dtype),
        d_key.astype(key.dtype),
        d_value.astype(value.dtype),
        None,
        None,
        None,
        None if sinks is None else _sink_gradient(sinks, lse, delta),
    )


def _sink_gradient(sinks, lse, delta):
    """`[heads]`: -sum over this device's rows of p_sink * (dO . O); rows with no key add 0."""
    p_sink = jnp.exp(jnp.where(jnp.isneginf(lse), -jnp.inf, sinks[None, :, None] - lse))
    return -(p_sink * delta).sum((0, 2)).astype(sinks.dtype)


def _payload(step, local, device, chunk):
    """What this device sends at a direct step: its whole shards, or only the chunks its
    receiver uses (`step.sent`)."""
    if step.sent is None:
        return local
    chunks = jnp.asarray(step.sent)[device]

    def gather(x):
        if x is None:
            return None
        blocks = x.reshape(x.shape[0], -1, chunk, *x.shape[2:])[:, chunks]
        return blocks.reshape(x.shape[0], -1, *x.shape[2:])

    return tuple(gather(x) for x in local)


def _go_home(home, travelling, step, device, chunk, axis_name):
    """`home` plus the gradients that travelled with `step`'s buffer, sent back to their owners
    and added at the chunks they came from."""
    arrived = _send(travelling, step.home, axis_name)
    if step.sent is None:
        return tuple(h + a for h, a in zip(home, arrived))
    chunks = jnp.asarray(step.sent)[device]

    def scatter(h, a):
        blocks = h.reshape(h.shape[0], -1, chunk, *h.shape[2:])
        added = a.reshape(a.shape[0], -1, chunk, *a.shape[2:])
        return blocks.at[:, chunks].add(added).reshape(h.shape)

    return tuple(scatter(h, a) for h, a in zip(home, arrived))


_ring.defvjp(_ring_fwd, _ring_bwd)


def sharded_ring_attention(
    query,
    key,
    value,
    *,
    mesh,
    axis_name="context",
    pattern=None,
    key_valid=None,
    segment_ids=None,
    scale=None,
    alibi_slopes=None,
    logit_soft_cap=None,
    sinks=None,
    length=None,
    order="contiguous",
    chunk=None,
    reorder=True,
):
    """`ring_attention` on whole-sequence arrays: reorders, shards over `axis_name`, restores.

    query is `[batch, length, heads, head_dim]`, key and value `[batch, length, kv_heads,
    head_dim or value_dim]`, key_valid and segment_ids `[batch, length]` or None, sinks
    `[heads]` or None; the length must divide into the axis' shards (2 chunks per shard for
    "zigzag"): pad it and mark the padding in key_valid, passing the real `length`. Other mesh
    axes see the arrays replicated. Returns `[batch, length, heads, value_dim]` in the
    natural order. Differentiable.

    With `reorder=False` the arrays are taken to be in `order` already (as an input pipeline
    would feed them: `to_zigzag` once, on the host) and the output stays in it. Reordering here
    permutes whole arrays inside the step, which costs a device memory of the whole sequence.
    """
    check_query_key_value(query, key, value)
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"the mesh has no axis {axis_name!r} to split the sequence over; its axes are "
            f"{tuple(mesh.axis_names)}."
        )
    num_shards = mesh.shape[axis_name]
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"ring attention is self-attention: query length {query.shape[1]} != key length "
            f"{key.shape[1]}."
        )
    _check_shards(query.shape[1], num_shards, order)
    reordering = order == "zigzag" and reorder
    if reordering:
        reorder = functools.partial(to_zigzag, num_shards=num_shards)
    else:
        reorder = lambda x: x  # noqa: E731
    spec = jax.sharding.PartitionSpec(None, axis_name)
    arrays = [reorder(x) for x in (query, key, value)]
    specs = [spec] * 3
    # Passed in, not closed over: the sinks' gradient leaves through shard_map's own transpose.
    optional = {"key_valid": key_valid, "segment_ids": segment_ids, "sinks": sinks}
    names = [name for name, x in optional.items() if x is not None]
    arrays += [jnp.asarray(optional[n]) if n == "sinks" else reorder(optional[n]) for n in names]
    specs += [jax.sharding.PartitionSpec() if n == "sinks" else spec for n in names]

    def per_device(q, k, v, *extra):
        return ring_attention(
            q,
            k,
            v,
            pattern=pattern,
            axis_name=axis_name,
            scale=scale,
            alibi_slopes=alibi_slopes,
            logit_soft_cap=logit_soft_cap,
            length=length,
            order=order,
            chunk=chunk,
            **dict(zip(names, extra)),
        )

    out = jax.shard_map(per_device, mesh=mesh, in_specs=tuple(specs), out_specs=spec)(*arrays)
    return from_zigzag(out, num_shards) if reordering else out
