"""Key/value caches for decoding that hold, and read, only what the pattern lets a query see.

A decoding step feeds one new token per batch row, each row at its own position p
(`positions` `[batch]` int32), and attends causally. What the step stores and reads follows the
layer's pattern, not the longest sequence the cache could hold (`max_len`):

  prefix  full or causal attention, and any pattern without a cheaper layout: keys and values
          of max_len positions, of which a step reads keys 0..p only (XLA reads whole segments,
          below). A step's work grows with the position, never with max_len. Patterns other
          than full and causal mask what it reads with their rule evaluated for row p alone
          (`row_allows`).
  ring    a sliding window `left` keys back, with or without anchor tokens: a ring of left + 1
          slots (or max_len, if fewer; position p goes to slot p % slots; with anchors, each
          slot also records its position), and the anchors in a small cache of their own.
          Memory and a step's work are O(left + anchors), however long the sequence.
  sparse  a window with random blocks (BigBird), and anchors: keys and values of max_len
          positions, since a random block may lie anywhere in the past, but a step gathers and
          attends over only its window, the anchors and its row's random blocks.

No layout builds the `[max_len, max_len]` mask: the mask of a step is one row per batch row.
A random pattern draws its blocks for `max_len` keys, so the steps match a full call of length
max_len. Keys are stored after rotary encoding (at their own positions), so a cache needs no
positional encoding of its own. Caches are head-major, `[batch, heads, length, head_dim]`.

On CPU (float32, head dims multiples of 16) a prefix cache of full or causal attention, and a
ring without anchors, take the fused kernel of `block_sparse/cpu_kernel.cc` (`plan.kernel`): it
writes a step's key and value in place and reads the keys it may see, in one call. Elsewhere
XLA runs the step, and a prefix cache is split into whole segments [0, 128), [128, 256),
[256, 512), ... (each as long as all before it), of which a step reads only those up to the
furthest row's position (at most 2x the keys it needs): slicing a buffer would copy it, and a
transposed read costs several times the products themselves on a CPU.

A step computes its scores as `dot_product_attention` does: the soft cap on q.k / sqrt(d), then
ALiBi, then the mask, and the sinks in the softmax's denominator (`step`'s arguments), in the
kernel and in XLA alike.

Pure functions over dicts of arrays (a Flax module keeps the dict in its decoding state):
`plan(pattern, dtype, head_dim)` -> `CachePlan`; `init` for an empty cache, `from_prompt` for
the keys and values a prompt's forward pass computed, and `step` for one decoding step.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer import patterns
from transformer.attention.block_sparse import cpu_kernel
from transformer.attention.dense import masked_einsum
from transformer.attention.sinks import per_head
from transformer.attention.soft_cap import soft_cap

# The first segment of a prefix cache; the others double the total, so a step reads at most 2x
# the keys it needs, with log2(max_len / 128) compiled branches.
FIRST_SEGMENT = 128


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """How a layer with this pattern caches keys and values (see the module docstring).

    kind: "prefix", "ring" or "sparse".
    pattern: the pattern without its causal part (None for full): the rule a prefix cache
      evaluates per row.
    left: how many keys back the window reaches (ring and sparse).
    anchors: sorted anchor positions (ring and sparse).
    random: the RandomBlocks part (sparse).
    kernel: the step runs the fused CPU kernel (full or causal prefix, ring without anchors).
    """

    kind: str
    pattern: patterns.Pattern | None = None
    left: int = 0
    anchors: tuple = ()
    random: patterns.RandomBlocks | None = None
    kernel: bool = False


def _without_causal(pattern):
    """The pattern a causal decoder step still has to apply: `pattern` minus its causal part."""
    if pattern is None or isinstance(pattern, (patterns.Full, patterns.Causal)):
        return None
    if isinstance(pattern, patterns.Intersection):
        rest = [p for p in pattern.parts if not isinstance(p, patterns.Causal)]
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else patterns.Intersection(tuple(rest))
    return pattern


def depends_on_length(pattern):
    """Whether the pattern's rows change with the key length (random blocks are drawn from the
    key blocks there are): a prompt's forward pass must then run at the cache's length."""
    if isinstance(pattern, patterns.RandomBlocks):
        return True
    if isinstance(pattern, (patterns.Union, patterns.Intersection)):
        return any(depends_on_length(part) for part in pattern.parts)
    return False


def _anchors_fit(anchors, left):
    """Whether a ring reaching `left` keys back and a cache of the `anchors` hold every key an
    anchor query sees: an anchor query at position a sees every key <= a, so every position
    before its window, a - left, must itself be an anchor."""
    return all(np.searchsorted(anchors, max(a - left, 0)) >= a - left for a in anchors)


def plan(pattern, dtype, head_dim):
    """The cache layout for a causal decoder layer with `pattern` (None: full attention) and
    keys and values of `dtype` and `head_dim` features per head."""
    kernel = cpu_kernel.supports_decode(dtype, head_dim, head_dim)
    core = _without_causal(pattern)
    if core is None:
        return CachePlan("prefix", kernel=kernel)
    parts = core.parts if isinstance(core, patterns.Union) else (core,)
    windows = [p for p in parts if isinstance(p, patterns.SlidingWindow)]
    anchors = [p for p in parts if isinstance(p, patterns.Anchor)]
    randoms = [p for p in parts if isinstance(p, patterns.RandomBlocks)]
    if windows and len(windows) + len(anchors) + len(randoms) == len(parts) and len(randoms) <= 1:
        # Under causality a union of windows is the one that reaches furthest back.
        left = max(w.left for w in windows)
        positions = tuple(sorted({a for part in anchors for a in part.positions}))
        if _anchors_fit(positions, left):  # else keep everything
            if randoms:
                return CachePlan("sparse", left=left, anchors=positions, random=randoms[0])
            return CachePlan("ring", left=left, anchors=positions, kernel=kernel and not anchors)
    return CachePlan("prefix", pattern=core)


def ring_size(cache_plan, max_len):
    """Slots of a ring: the window and the query, or max_len when that is fewer (positions
    below max_len then never wrap)."""
    return min(cache_plan.left + 1, max_len)


def init(cache_plan, batch, max_len, heads, head_dim, dtype):
    """An empty cache for `batch` rows and positions `[0, max_len)`."""

    def buffer(length):
        return jnp.zeros((batch, heads, length, head_dim), dtype)

    if cache_plan.kind == "ring":
        size = ring_size(cache_plan, max_len)
        cache = {"key": buffer(size), "value": buffer(size)}
        if cache_plan.kernel:  # the kernel knows each slot's position from the step's
            return cache
        cache["position"] = jnp.full((batch, size), -1, jnp.int32)  # -1: empty
        if cache_plan.anchors:
            cache["anchor_key"] = buffer(len(cache_plan.anchors))
            cache["anchor_value"] = buffer(len(cache_plan.anchors))
        return cache
    if cache_plan.kind == "prefix" and not cache_plan.kernel:
        sizes = np.diff(segment_bounds(max_len))
        return {"key": [buffer(n) for n in sizes], "value": [buffer(n) for n in sizes]}
    return {"key": buffer(max_len), "value": buffer(max_len)}


@dataclasses.dataclass(frozen=True)
class LogitOptions:
    """What a step does to its scores q.k / sqrt(head_dim) besides masking: the soft cap
    (c or None), then ALiBi's slopes (`[heads]` or None); and the sinks (`[heads]` or None) in
    the softmax's denominator. As `dot_product_attention` does, in the same order."""

    alibi_slopes: object = None
    soft_cap: float | None = None
    sinks: object = None


def step(
    cache_plan,
    cache,
    query,
    key,
    value,
    positions,
    alibi_slopes=None,
    *,
    logit_soft_cap=None,
    sinks=None,
):
    """One decoding step: query, key and value `[batch, 1, heads, head_dim]` of one new position
    per row, at `positions` `[batch]` int32. Returns the attention output
    `[batch, 1, heads, head_dim]` over every key the pattern lets that position see (its own
    included), and the cache with the new key and value in it. Positions run from 0 to
    max_len - 1; a negative one writes and reads nothing (zeros). alibi_slopes, logit_soft_cap
    and sinks as in `dot_product_attention` (the scale is 1/sqrt(head_dim))."""
    if cache_plan.kernel:
        out, key_cache, value_cache = cpu_kernel.decode_step(
            query[:, 0],
            key[:, 0],
            value[:, 0],
            cache["key"],
            cache["value"],
            positions,
            alibi_slopes,
            ring=cache_plan.kind == "ring",
            logit_soft_cap=logit_soft_cap,
            sinks=sinks,
        )
        return out[:, None], {"key": key_cache, "value": value_cache}
    cache = _write(cache_plan, cache, key[:, 0], value[:, 0], positions)
    batch, _, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    # Grouped-query attention: the group's query heads take the place of the query axis,
    # `[batch, kv_heads, group, head_dim]`, so each cached key is read once for them all and
    # the cache is never repeated to `heads`; ALiBi's slopes and the sinks follow that layout.
    query = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    grouped = lambda x, *rest: None if x is None else jnp.reshape(x, (kv_heads, -1, *rest))
    options = LogitOptions(grouped(alibi_slopes), logit_soft_cap, grouped(sinks, 1))
    out = _attend_heads(cache_plan, cache, query, positions, options)
    return out.reshape(batch, 1, heads, -1), cache


def _write(cache_plan, cache, key, value, positions):
    """The cache with one new key and value per row: key/value `[batch, heads, head_dim]` at
    `positions` `[batch]` int32 (prefix and sparse: positions past max_len are dropped)."""
    rows = jnp.arange(key.shape[0])
    if cache_plan.kind == "prefix":
        bounds = segment_bounds(sum(segment.shape[2] for segment in cache["key"]))
        new = {"key": [], "value": []}
        for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            # Rows whose position is in another segment write out of range: dropped.
            offset = jnp.where((positions >= start) & (positions < end), positions - start, end)
            for name, update in (("key", key), ("value", value)):
                segment = cache[name][index]
                new[name].append(
                    segment.at[rows, :, offset].set(update.astype(segment.dtype), mode="drop")
                )
        return new
    key, value = key.astype(cache["key"].dtype), value.astype(cache["value"].dtype)
    if cache_plan.kind == "sparse":
        # A negative position writes nothing (it would index from the end).
        slot = jnp.where(positions >= 0, positions, cache["key"].shape[2])
    else:
        size = cache["key"].shape[2]
        slot = jnp.where(positions >= 0, positions % size, size)
    cache = {
        **cache,
        "key": cache["key"].at[rows, :, slot].set(key, mode="drop"),
        "value": cache["value"].at[rows, :, slot].set(value, mode="drop"),
    }
    if cache_plan.kind == "sparse":
        return cache
    cache["position"] = cache["position"].at[rows, slot].set(positions, mode="drop")
    if cache_plan.anchors:
        anchors = jnp.asarray(cache_plan.anchors, jnp.int32)
        index = jnp.clip(jnp.searchsorted(anchors, positions), 0, len(cache_plan.anchors) - 1)
        is_anchor = (anchors[index] == positions)[:, None, None]
        for name, new in (("anchor_key", key), ("anchor_value", value)):
            old = cache[name][rows, :, index]
            cache[name] = cache[name].at[rows, :, index].set(jnp.where(is_anchor, new, old))
    return cache


def row_allows(pattern, q_pos, k_pos, max_len):
    """`pattern.allows` in JAX for traced positions: q_pos `[batch, 1]`, k_pos `[batch or 1, n]`
    -> bool `[batch, n]`, for a query and keys in a sequence of max_len. The named patterns are
    built from their description, with constants no larger than max_len (anchors) or the random
    blocks' table; any other pattern through its own `allows`, if that takes jax arrays."""
    if isinstance(pattern, patterns.Full):
        return jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    if isinstance(pattern, (patterns.Causal, patterns.SlidingWindow)):
        return pattern.allows(q_pos, k_pos, max_len, max_len)
    if isinstance(pattern, patterns.Anchor):
        is_anchor = jnp.asarray(pattern._is_anchor(max_len))
        return is_anchor[q_pos] | is_anchor[k_pos]
    if isinstance(pattern, patterns.RandomBlocks):
        table = jnp.asarray(pattern.key_blocks(max_len, max_len), jnp.int32)
        blocks = table[q_pos // pattern.block_size]  # [batch, 1, num_blocks]
        return jnp.any((k_pos // pattern.block_size)[..., None] == blocks, axis=-1)
    if isinstance(pattern, (patterns.Union, patterns.Intersection)):
        combine = jnp.logical_or if isinstance(pattern, patterns.Union) else jnp.logical_and
        allowed = [row_allows(p, q_pos, k_pos, max_len) for p in pattern.parts]
        result = allowed[0]
        for other in allowed[1:]:
            result = combine(result, other)
        return result
    # Other patterns: their own `allows`, if it computes with jax arrays as with NumPy ones.
    try:
        allowed = pattern.allows(q_pos, k_pos, max_len, max_len)
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        allowed = None
    if not isinstance(allowed, jax.Array):
        raise ValueError(
            f"decoding needs a row rule for pattern {pattern} ({type(pattern).__name__}): "
            "its `allows` must compute with jax arrays (decoding evaluates it for one traced "
            "position at a time), as those of full, causal, sliding_window, anchor and random do."
        )
    return jnp.broadcast_to(allowed, jnp.broadcast_shapes(q_pos.shape, k_pos.shape))


def segment_bounds(max_len):
    """`[0, 128, 256, 512, ..., max_len]`: where the segments of a prefix cache start and end."""
    bounds = [0]
    while bounds[-1] < max_len:
        bounds.append(min(max(2 * bounds[-1], FIRST_SEGMENT), max_len))
    return bounds


def _partial_attention(query, key, value, key_positions, valid, positions, options):
    """Attention of one query per row over one part of the keys, as (largest logit, sum of
    exponentials, unnormalised output), for `_combine`: query `[batch, heads, 1, head_dim]`,
    key/value `[batch, heads, n, head_dim]`, key_positions and valid `[batch, n]`.

    Masked keys get weight 0 and never reach the output, whatever they hold; a part with no
    valid key has largest logit -inf and sum 0.
    """
    logits = jnp.einsum("bhqd,bhkd->bhqk", query, key, preferred_element_type=jnp.float32)
    logits = soft_cap(logits * query.shape[-1] ** -0.5, options.soft_cap)
    alibi_slopes = options.alibi_slopes
    if alibi_slopes is not None:
        # ALiBi from the stored positions: the query is at p, not at 0, and slots are unordered.
        distance = jnp.abs(positions[:, None] - key_positions).astype(jnp.float32)
        slopes = jnp.asarray(alibi_slopes, jnp.float32)  # [kv_heads, group]
        logits = logits - slopes[None, :, :, None] * distance[:, None, None, :]
    valid = valid[:, None, None, :]
    largest = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True)
    shift = jnp.where(jnp.isfinite(largest), largest, 0.0)
    weights = jnp.where(valid, jnp.exp(logits - shift), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    # Over valid keys only: a NaN or inf value of a key the pattern excludes (or of padding)
    # must not meet its zero weight (0 * NaN = NaN), as in the dense reference.
    out = masked_einsum(
        "bhqk,bhkd->bhqd",
        weights.astype(value.dtype),
        valid,
        value,
        preferred_element_type=jnp.float32,
    )
    return largest, total, out


def _combine(parts, sinks=None):
    """softmax-weighted output from `_partial_attention` results, with the sinks `[heads]` (or
    None) in the denominator; zeros for a row with no key."""
    largest = functools.reduce(jnp.maximum, [part[0] for part in parts])
    shift = jnp.where(jnp.isfinite(largest), largest, 0.0)
    if sinks is not None:
        sink = per_head(sinks, largest.ndim)
        has_key = largest != -jnp.inf  # a NaN largest has keys: its row is NaN
        shift = jnp.where(has_key, jnp.maximum(shift, sink), shift)
    total, out = 0.0, 0.0
    for part_largest, part_total, part_out in parts:
        factor = jnp.exp(part_largest - shift)  # 0 for a part with no valid key
        total = total + factor * part_total
        out = out + factor * part_out
    if sinks is not None:  # nothing of the sink where no key is: those rows give zeros
        total = total + jnp.where(has_key, jnp.exp(sink - shift), 0.0)
    return out / jnp.where(total > 0, total, 1.0)


def _attend_over(query, keys, values, key_positions, valid, positions, options):
    """Softmax attention of one query per row over keys in parts: query
    `[batch, heads, 1, head_dim]`, keys and values lists of `[batch, heads, n_i, head_dim]`,
    key_positions and valid `[batch, sum n_i]` -> `[batch, heads, 1, head_dim]`. The parts are
    never concatenated."""
    parts, start = [], 0
    for key, value in zip(keys, values):
        end = start + key.shape[2]
        parts.append(
            _partial_attention(
                query,
                key,
                value,
                key_positions[:, start:end],
                valid[:, start:end],
                positions,
                options,
            )
        )
        start = end
    return _combine(parts, options.sinks).astype(query.dtype)


def _gather(buffer, index):
    """buffer `[batch, heads, length, head_dim]` at index `[batch, n]` (clipped into range) ->
    `[batch, heads, n, head_dim]`."""
    index = jnp.clip(index, 0, buffer.shape[2] - 1)
    return jax.vmap(lambda rows, i: rows[:, i])(buffer, index)


def _attend_heads(cache_plan, cache, query, positions, options):
    """The XLA step's attention: query `[batch, heads, 1, head_dim]` -> same shape."""
    if cache_plan.kind == "ring":
        return _attend_ring(cache_plan, cache, query, positions, options)
    if cache_plan.kind == "sparse":
        return _attend_sparse(cache_plan, cache, query, positions, options)
    return _attend_prefix(cache_plan, cache, query, positions, options)


def _attend_ring(cache_plan, cache, query, positions, options):
    """The ring's window, and the anchors before it."""
    p = positions[:, None]
    keys, values, key_positions = [cache["key"]], [cache["value"]], cache["position"]
    valid = (key_positions >= 0) & (key_positions <= p) & (key_positions >= p - cache_plan.left)
    if cache_plan.anchors:
        anchors = jnp.asarray(cache_plan.anchors, jnp.int32)
        anchors = jnp.broadcast_to(anchors, (positions.shape[0], anchors.size))
        keys.append(cache["anchor_key"])
        values.append(cache["anchor_value"])
        # Anchors inside the window are in the ring already: count each key once.
        anchor_valid = anchors < p - cache_plan.left
        valid = jnp.concatenate([valid, anchor_valid], axis=1)
        key_positions = jnp.concatenate([key_positions, anchors], axis=1)
    return _attend_over(query, keys, values, key_positions, valid, positions, options)


def _attend_prefix(cache_plan, cache, query, positions, options):
    """The segments that hold a key some row may see, each whole, the others skipped."""
    bounds = segment_bounds(sum(segment.shape[2] for segment in cache["key"]))
    parts = []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):

        def read(query, key, value, positions, start=start, end=end):
            # Inside the branch: a skipped segment costs nothing, its mask included.
            key_positions = jnp.arange(start, end)[None, :]
            valid = key_positions <= positions[:, None]
            if cache_plan.pattern is not None:
                valid &= row_allows(
                    cache_plan.pattern, positions[:, None], key_positions, bounds[-1]
                )
            return _partial_attention(query, key, value, key_positions, valid, positions, options)

        def skip(query, key, value, positions):
            rows, head_dim = query.shape[:3], value.shape[-1]
            return (
                jnp.full((*rows, 1), -jnp.inf, jnp.float32),
                jnp.zeros((*rows, 1), jnp.float32),
                jnp.zeros((*rows, head_dim), jnp.float32),
            )

        # One small conditional per segment, whose result is three small arrays: a branch that
        # took or returned the whole cache would make XLA copy it.
        parts.append(
            jax.lax.cond(
                start <= jnp.max(positions),
                read,
                skip,
                query,
                cache["key"][index],
                cache["value"][index],
                positions,
            )
        )
    return _combine(parts, options.sinks).astype(query.dtype)


def _attend_sparse(cache_plan, cache, query, positions, options):
    """Window, anchors and random blocks gathered from a max_len buffer, each key once."""
    p = positions[:, None]
    max_len = cache["key"].shape[2]
    left = cache_plan.left
    window = p - left + jnp.arange(left + 1)[None, :]  # [batch, left + 1]
    in_window = lambda k: (k >= p - left) & (k <= p)
    segments = [(window, window >= 0)]
    is_anchor = np.zeros(max_len, bool)
    anchors = np.asarray([a for a in cache_plan.anchors if a < max_len], np.int32)
    if anchors.size:
        is_anchor[anchors] = True
        anchors = jnp.broadcast_to(jnp.asarray(anchors), (positions.shape[0], anchors.size))
        segments.append((anchors, (anchors <= p) & ~in_window(anchors)))
    random = cache_plan.random
    table = jnp.asarray(random.key_blocks(max_len, max_len), jnp.int32)
    blocks = table[positions // random.block_size]  # [batch, num_blocks]
    block_keys = blocks[:, :, None] * random.block_size + jnp.arange(random.block_size)
    block_keys = block_keys.reshape(positions.shape[0], -1)
    # A random block overlapping the window or the anchors gives those keys only once.
    not_yet = ~in_window(block_keys) & ~jnp.asarray(is_anchor)[jnp.clip(block_keys, 0, max_len - 1)]
    segments.append((block_keys, (block_keys < max_len) & (block_keys <= p) & not_yet))
    key_positions = jnp.concatenate([s[0] for s in segments], axis=1)
    valid = jnp.concatenate([s[1] for s in segments], axis=1)
    keys, values = [_gather(cache["key"], key_positions)], [_gather(cache["value"], key_positions)]
    return _attend_over(query, keys, values, key_positions, valid, positions, options)


def check_prompt_fits(prompt_len, max_len):
    """Raises ValueError when a prompt of `prompt_len` positions exceeds a cache of max_len."""
    if prompt_len > max_len:
        raise ValueError(f"a prompt of {prompt_len} tokens does not fit a cache of {max_len}.")


def from_prompt(cache_plan, key, value, lengths, max_len):
    """The cache after a prompt whose keys and values `[batch, prompt_len, heads, head_dim]` a
    forward pass computed (rows right-padded: row b's first `lengths[b]` positions are real).

    The next step of row b is at position lengths[b]. Keys past a row's length are padding: a
    prefix or sparse cache holds them where later steps overwrite them before any query may
    see them; a ring picks per row the last left + 1 real positions.
    """
    batch, prompt_len, heads, head_dim = key.shape
    key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
    if cache_plan.kind != "ring":
        check_prompt_fits(prompt_len, max_len)
        padding = ((0, 0), (0, 0), (0, max_len - prompt_len), (0, 0))
        key, value = jnp.pad(key, padding), jnp.pad(value, padding)
        if cache_plan.kind == "sparse" or cache_plan.kernel:
            return {"key": key, "value": value}
        bounds = segment_bounds(max_len)
        return {
            name: [full[:, :, start:end] for start, end in zip(bounds[:-1], bounds[1:])]
            for name, full in (("key", key), ("value", value))
        }
    size = ring_size(cache_plan, max_len)
    last = lengths[:, None] - 1
    # Slot s holds the latest real position q <= last with q % size == s (or nothing, -1).
    slot_positions = last - (last - jnp.arange(size)[None, :]) % size
    slot_positions = jnp.where(slot_positions >= 0, slot_positions, -1).astype(jnp.int32)
    written = (slot_positions >= 0)[:, None, :, None]
    cache = {
        # Unwritten slots hold zeros, as in an empty cache: weight 0 times zero adds nothing.
        name: jnp.where(written, _gather(source, slot_positions), 0).astype(source.dtype)
        for name, source in (("key", key), ("value", value))
    }
    if cache_plan.kernel:  # which it tells from the step's position
        return cache
    cache["position"] = slot_positions
    if cache_plan.anchors:
        anchors = jnp.asarray(cache_plan.anchors, jnp.int32)
        in_prompt = (anchors < prompt_len)[None, None, :, None]
        index = jnp.broadcast_to(anchors, (batch, anchors.size))
        for name, source in (("anchor_key", key), ("anchor_value", value)):
            cache[name] = jnp.where(in_prompt, _gather(source, index), 0).astype(source.dtype)
    return cache
