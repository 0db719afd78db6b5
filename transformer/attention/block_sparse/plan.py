"""The block-sparse planner: which blocks a pattern needs, and in what order to walk them.

NumPy only, run once per (pattern, lengths, block sizes) and cached. From the pattern's block
layout it finds the non-empty (query block, key block) pairs, the exact masks of the partial
ones, and groups them into scan steps for the XLA schedules (`xla_schedules.py`) and into rows
for the fused CPU kernel (`cpu_kernel.py`).

Two kinds of schedule, both derived from the layout alone:
- whole rows: when most query blocks need about the same number of key blocks (sliding windows,
  random blocks, BigBird without its anchor rows), rows are grouped by that number and each step
  computes a couple of complete rows: a plain softmax, nothing carried between steps, and each
  step's products small enough to stay in cache;
- row pieces: other rows (causal layouts, BigBird's anchor rows that see every key) are cut into
  items of `slots` key blocks dealt onto steps so that no two items of a step share a row, and
  combined by online softmax (max, sum, output, as in FlashAttention).

Dense rows, whose queries see every key (BigBird's anchor rows), can be left out of the schedules
(`dense_rows_apart`): the XLA path sends them to chunked attention, whose large tiles run at a
higher FLOP rate than block-sized pieces. The CPU kernel walks them like any other row.
"""

import dataclasses
import functools

import numpy as np

from transformer.patterns import EMPTY, FULL

# Scores of one scan step stay under this many elements (per batch element and head): enough work
# per step to amortise the loop, little enough to stay in cache-friendly sizes.
_SCORES_PER_STEP = 256 * 1024
# The same for steps of whole rows, which keep no accumulators between steps: small enough that a
# step's scores stay in cache (on CPU, steps of 1M elements ran at a markedly lower FLOP rate).
_ROW_SCORES_PER_STEP = 64 * 1024
# A step of at least twice this many rows is computed as two independent halves (`_halves`).
_ROWS_PER_CHAIN = 1
# Whole-row schedules are used when padding rows to their group's longest adds at most this
# fraction of work.
_MAX_ROW_PADDING = 1.1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which blocks each scan step computes: `[steps, items]` query blocks, `[steps, items,
    slots]` key blocks and mask ids. A query block index of `num_q_blocks` marks a padding item,
    whose writes are dropped; mask id 0 means all-allowed (a full block), 1 nothing allowed (a
    padding slot)."""

    q_block: np.ndarray
    kv_block: np.ndarray
    mask_id: np.ndarray
    whole_rows: bool  # each item is one query block with all its key blocks

    @property
    def needs_mask(self):
        return bool((self.mask_id != 0).any())


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: plans are cached
class Plan:
    """How to walk a pattern's non-empty blocks; NumPy, built once per (pattern, shapes).

    Each query block (row) belongs to one schedule. When rows need about the same number of key
    blocks, they are grouped by that number and each item of a group's schedule is a whole row,
    so each step finishes its rows' softmax. Rows too wide for one step (BigBird's anchor rows)
    and layouts whose rows differ too much (causal) go to a schedule whose items are pieces of
    rows, combined by online softmax.
    """

    block_q: int
    block_kv: int
    num_q_blocks: int
    num_kv_blocks: int
    schedules: tuple
    block_masks: np.ndarray  # [num_masks, block_q, block_kv] bool
    computed_blocks: int  # non-empty (query block, key block) pairs, dense rows included
    dense_q_blocks: np.ndarray  # query blocks left to chunked attention (they see every key)
    # The scheduled blocks row by row, for the fused CPU kernel: (rows, row_start, kv_block,
    # mask_id), row r's key blocks being kv_block[row_start[r]:row_start[r + 1]].
    row_blocks: tuple
    # Query heads per key/value head folded into each query block's rows (`grouped`): block_q
    # is then group x the pattern's query block, rows ordered (head in group, position).
    group: int = 1

    @property
    def query_block(self):
        """The pattern's query block: block_q without the folded heads."""
        return self.block_q // self.group

    @property
    def kv_block(self):
        """Every scheduled key block (padding slots included), flat."""
        return np.concatenate([s.kv_block.reshape(-1) for s in self.schedules] + [np.zeros(0, int)])

    @property
    def mask_id(self):
        """The mask id of every scheduled key block, flat like `kv_block`."""
        return np.concatenate([s.mask_id.reshape(-1) for s in self.schedules] + [np.zeros(0, int)])


def _partial_block_masks(pattern, q_len, kv_len, block_q, block_kv, q_blocks, kv_blocks):
    """`[n, block_q, block_kv]` exact masks of the given blocks; positions past the lengths are False."""
    q_pos = q_blocks[:, None, None] * block_q + np.arange(block_q)[None, :, None]
    k_pos = kv_blocks[:, None, None] * block_kv + np.arange(block_kv)[None, None, :]
    in_range = (q_pos < q_len) & (k_pos < kv_len)
    allowed = pattern.allows(
        np.minimum(q_pos, q_len - 1), np.minimum(k_pos, kv_len - 1), q_len, kv_len
    )
    return allowed & in_range


def _non_empty_blocks(pattern, q_len, kv_len, block_q, block_kv):
    """Row-major (query block, key block, mask id) of the non-empty blocks, and the masks."""
    layout = pattern.block_layout(q_len, kv_len, block_q, block_kv)
    # Classify partial blocks exactly: the layout may call a block partial when it is full or empty.
    q_idx, kv_idx = np.nonzero(layout != EMPTY)
    mask_id = np.zeros(len(q_idx), np.int64)
    masks = [np.ones((block_q, block_kv), bool), np.zeros((block_q, block_kv), bool)]
    partial = layout[q_idx, kv_idx] != FULL
    if partial.any():
        block_masks = _partial_block_masks(
            pattern, q_len, kv_len, block_q, block_kv, q_idx[partial], kv_idx[partial]
        )
        unique, inverse = np.unique(
            block_masks.reshape(len(block_masks), -1), axis=0, return_inverse=True
        )
        unique = unique.reshape(-1, block_q, block_kv)
        # Ids 0 and 1 are the all-True and all-False masks; the rest are the distinct partial ones.
        remap = np.where(
            unique.all((1, 2)), 0, np.where(~unique.any((1, 2)), 1, 2 + np.arange(len(unique)))
        )
        mask_id[partial] = remap[inverse.reshape(-1)]
        masks += list(unique)
    keep = mask_id != 1
    q_idx, kv_idx, mask_id = q_idx[keep], kv_idx[keep], mask_id[keep]
    masks = np.stack(masks)
    # Renumber mask ids densely, keeping 0 and 1 in place.
    used = np.union1d([0, 1], np.unique(mask_id))
    renumber = np.zeros(len(masks), np.int64)
    renumber[used] = np.arange(len(used))
    return q_idx, kv_idx, renumber[mask_id], masks[used]


def _dense_rows(q_len, kv_len, block_q, block_kv, q_idx, kv_idx, mask_id, masks):
    """Query blocks whose every query may attend to every key (positions past the lengths aside)."""
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
    candidate = np.bincount(q_idx, minlength=num_q_blocks) == num_kv_blocks
    chosen = candidate[q_idx]
    q_blocks, kv_blocks, ids = q_idx[chosen], kv_idx[chosen], mask_id[chosen]
    # Inside the lengths a block must be all-allowed (mask 0); a block on the edge must allow
    # exactly its positions inside the lengths.
    edge = ((q_blocks + 1) * block_q > q_len) | ((kv_blocks + 1) * block_kv > kv_len)
    allowed_all = ids == 0
    if edge.any():
        q_pos = q_blocks[edge, None, None] * block_q + np.arange(block_q)[None, :, None]
        k_pos = kv_blocks[edge, None, None] * block_kv + np.arange(block_kv)[None, None, :]
        in_range = (q_pos < q_len) & (k_pos < kv_len)
        allowed_all[edge] = (masks[ids[edge]] == in_range).all((1, 2))
    return np.setdiff1d(np.nonzero(candidate)[0], q_blocks[~allowed_all])


def _choose_slots(counts):
    """Key blocks per item: few padding slots, but not so few that accumulator traffic dominates."""

    def cost(slots):
        items = -(-counts // slots)
        return (items * slots).sum() + 0.5 * items.sum()

    return min((1, 2, 4, 8, 16), key=cost)


def _row_groups(counts):
    """Split the non-empty rows into (at most) two groups by count, or None if that pads too much.

    Each group is padded to its longest row; BigBird-like layouts (a few dense anchor rows, the
    rest with about the same number of blocks) pad little, causal-like ones (every count from 1
    to n) too much, and go to the item schedule instead.
    """
    rows = np.nonzero(counts)[0]
    if not len(rows):
        return None
    rows = rows[np.argsort(counts[rows], kind="stable")]
    ordered = counts[rows]
    # Split s: rows[:s] padded to ordered[s - 1], rows[s:] to ordered[-1].
    split = np.arange(len(rows))
    cost = split * ordered[np.maximum(split - 1, 0)] + (len(rows) - split) * ordered[-1]
    best = int(np.argmin(cost))
    if cost[best] > _MAX_ROW_PADDING * ordered.sum():
        return None
    return [group for group in (rows[:best], rows[best:]) if len(group)]


def _whole_row_schedule(group, counts, row_start, kv_idx, mask_id, num_q_blocks, block_q, block_kv):
    """Items of whole rows (ascending query block), padded with mask id 1 to the longest row."""
    group = np.sort(group)
    width = int(counts[group].max())
    entry = row_start[group][:, None] + np.arange(width)
    valid = np.arange(width) < counts[group][:, None]
    entry = np.where(valid, entry, 0)
    kv = np.where(valid, kv_idx[entry], 0)
    ids = np.where(valid, mask_id[entry], 1)
    rows_per_step = max(1, _ROW_SCORES_PER_STEP // (width * block_q * block_kv))
    steps = -(-len(group) // rows_per_step)
    per_step = -(-len(group) // steps)
    pad = steps * per_step - len(group)
    q = np.concatenate([group, np.full(pad, num_q_blocks)]).reshape(steps, per_step)
    kv = np.concatenate([kv, np.zeros((pad, width), int)]).reshape(steps, per_step, width)
    ids = np.concatenate([ids, np.ones((pad, width), int)]).reshape(steps, per_step, width)
    return Schedule(q.astype(np.int32), kv.astype(np.int32), ids.astype(np.int32), True)


def _item_schedule(q_idx, kv_idx, mask_id, counts, num_q_blocks, block_q, block_kv):
    """Rows cut into items of `slots` key blocks, dealt round-robin onto scan steps."""
    slots = _choose_slots(counts[counts > 0]) if len(q_idx) else 1
    # Items: each row's key blocks (in order) cut into groups of `slots`, padded with slot id 1.
    row_start = np.concatenate([[0], np.cumsum(counts)])
    items_per_row = -(-counts // slots)
    num_items = max(int(items_per_row.sum()), 1)
    item_q = np.repeat(np.arange(num_q_blocks), items_per_row)
    item_first = np.concatenate([np.arange(0, c, slots) for c in counts if c] or [np.zeros(0, int)])
    item_row_end = np.repeat(row_start[1:], items_per_row)
    entry = (np.repeat(row_start[:-1], items_per_row) + item_first)[:, None] + np.arange(slots)
    valid = entry < item_row_end[:, None]
    entry = np.where(valid, entry, 0)
    item_kv = np.where(valid, kv_idx[entry] if len(kv_idx) else 0, 0)
    item_mask = np.where(valid, mask_id[entry] if len(mask_id) else 1, 1)
    if not len(q_idx):
        item_q, item_kv, item_mask = (
            np.full(1, num_q_blocks),
            np.zeros((1, slots), int),
            np.ones((1, slots), int),
        )

    # Round-robin the items onto steps: a row's items are consecutive and no more than `steps`,
    # so they land on distinct steps.
    max_items = max(1, _SCORES_PER_STEP // (slots * block_q * block_kv))
    steps = max(int(items_per_row.max(initial=1)), -(-num_items // max_items))
    per_step = -(-num_items // steps)
    total = steps * per_step
    pad = total - num_items
    item_q = np.concatenate([item_q, np.full(pad, num_q_blocks)])
    item_kv = np.concatenate([item_kv, np.zeros((pad, slots), int)])
    item_mask = np.concatenate([item_mask, np.ones((pad, slots), int)])
    # Item t goes to step t % steps, position t // steps.
    order = lambda a: a.reshape(per_step, steps, *a.shape[1:]).swapaxes(0, 1).astype(np.int32)
    return Schedule(order(item_q), order(item_kv), order(item_mask), False)


@functools.lru_cache(maxsize=32)
def make_plan(pattern, q_len, kv_len, block_q, block_kv, dense_rows_apart=True):
    """The scan schedules for `pattern` at these lengths and block sizes (cached).

    With `dense_rows_apart`, query blocks that see every key are left out of the schedules, for
    chunked attention (`Plan.dense_q_blocks`).
    """
    num_q_blocks, num_kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
    q_idx, kv_idx, mask_id, masks = _non_empty_blocks(pattern, q_len, kv_len, block_q, block_kv)
    computed_blocks = len(q_idx)
    dense_q_blocks = np.zeros(0, np.int64)
    if dense_rows_apart:
        dense_q_blocks = _dense_rows(
            q_len, kv_len, block_q, block_kv, q_idx, kv_idx, mask_id, masks
        )
        scheduled = ~np.isin(q_idx, dense_q_blocks)
        q_idx, kv_idx, mask_id = q_idx[scheduled], kv_idx[scheduled], mask_id[scheduled]
    rows = np.unique(q_idx)
    row_blocks = (rows, np.searchsorted(q_idx, np.append(rows, num_q_blocks)), kv_idx, mask_id)
    if not len(q_idx):
        return Plan(
            block_q,
            block_kv,
            num_q_blocks,
            num_kv_blocks,
            (),
            masks,
            computed_blocks,
            dense_q_blocks,
            row_blocks,
        )
    counts = np.bincount(q_idx, minlength=num_q_blocks)
    groups = _row_groups(counts) or []
    wide = [g for g in groups if counts[g].max() * block_q * block_kv > _ROW_SCORES_PER_STEP]
    narrow = [g for g in groups if counts[g].max() * block_q * block_kv <= _ROW_SCORES_PER_STEP]
    row_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    schedules = [
        _whole_row_schedule(
            group, counts, row_start, kv_idx, mask_id, num_q_blocks, block_q, block_kv
        )
        for group in narrow
    ]
    if not groups or wide:
        rest = np.isin(q_idx, np.concatenate(wide)) if wide else np.ones(len(q_idx), bool)
        schedules.append(
            _item_schedule(
                q_idx[rest],
                kv_idx[rest],
                mask_id[rest],
                np.bincount(q_idx[rest], minlength=num_q_blocks),
                num_q_blocks,
                block_q,
                block_kv,
            )
        )
    return Plan(
        block_q,
        block_kv,
        num_q_blocks,
        num_kv_blocks,
        tuple(schedules),
        masks,
        computed_blocks,
        dense_q_blocks,
        row_blocks,
    )


@functools.lru_cache(maxsize=32)
def grouped(plan, group):
    """`plan` for grouped-query attention: the `group` query heads that share a key/value head
    are folded into each query block's rows, `[kv_heads, num_q_blocks, group * block_q, d]`, so
    the same key blocks serve them all and no key or value is repeated. The pattern depends on
    positions only, so each head's rows take the same masks (tiled); block indices are unchanged.
    """
    if group == 1:
        return plan
    return dataclasses.replace(
        plan,
        block_q=plan.block_q * group,
        block_masks=np.tile(plan.block_masks, (1, group, 1)),
        group=group,
    )
