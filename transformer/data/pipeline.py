"""grain input pipelines: TFDS data source -> host shard -> shuffle -> encode -> padded batches.

    it = make_iterator(data_config, "train", global_batch_size=64, seed=0,
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)             # this host's share: 64 // process_count rows
    state = it.get_state()       # save with the checkpoint (grain.checkpoint for Orbax) ...
    it.set_state(state)          # ... and continue exactly there after a restart

Batches are dicts of NumPy int32 arrays, B = global_batch_size // process_count:
  classification      {"inputs": [B, L], "targets": [B]}
  language_modelling  {"inputs": [B, L], "targets": [B, L]}   targets[:, t] == inputs[:, t + 1]
  seq2seq             {"inputs": [B, Ls], "targets": [B, Lt]}

Token id 0 is padding. Inputs longer than max_length (targets longer than max_target_length) are
cut. A finite iterator (num_epochs set) whose examples do not fill the last batch pads it with
rows of zeros whose classification target is -1: give no loss to targets that are 0 (tokens) or
-1 (classes). Every host yields the same number of batches, so multi-host evaluation stays in
step.

Language modelling, two ways:
- data.pack_documents=False (the default): the split's documents, each followed by EOS, make one
  stream cut into windows of max_length + 1 tokens; a window may span two documents (EOS marks
  where) and its tokens attend across the boundary.
- data.pack_documents=True: each document becomes its own (input, target) pairs, BOS t1 .. tn
  -> t1 .. tn EOS, laid end to end and cut into windows of max_length pairs (`PackedWindows`).
  Batches also carry "segment_ids" [B, L] (1, 2, ... per document piece of a row) and
  "positions" [B, L] (restarting at 0 for each piece), which the model reads so that no token
  attends to another document and positions restart. No target is the next document's first
  token.
"""

import grain
import numpy as np
from grain.experimental import FlatMapIterDataset, FlatMapTransform

from transformer.data import registry, spec, tokenizers

_PADDING_CLASS = -1
# What packed language-modelling windows carry beside inputs and targets.
_PACKED_KEYS = ("segment_ids", "positions")


class _TokenWindows:
    """Random access to windows of `length` + 1 tokens of one token stream, stride `length`."""

    def __init__(self, stream: np.ndarray, length: int):
        if len(stream) < length + 1:
            raise ValueError(
                f"The split has {len(stream)} tokens, fewer than one window of "
                f"max_length + 1 = {length + 1}."
            )
        self._stream, self._length = stream, length

    def __len__(self):
        return (len(self._stream) - 1) // self._length

    def __getitem__(self, index):
        window = self._stream[index * self._length : (index + 1) * self._length + 1]
        return {"inputs": window[:-1], "targets": window[1:]}


class PackedWindows:
    """Random access to windows of `length` (input, target) pairs of documents packed end to end.

    Document d with tokens t1 .. tn gives the n + 1 pairs BOS t1 .. tn -> t1 .. tn EOS: every
    token is predicted from its own document alone, the first from BOS (as a decoder starts),
    and no target is the next document's first token. The pairs of all documents are laid end to
    end and cut into windows every `length` pairs, so no position is padding; a document that
    crosses a window's edge is cut there, and each piece is a segment of its own whose positions
    start at 0 (as seqio's split-then-pack and MaxText's packing do; the piece cannot see the
    part before the edge anyway).

    A window is {"inputs", "targets", "segment_ids", "positions"}, each int32 `[length]`;
    segment_ids number the window's pieces 1, 2, ...
    """

    def __init__(self, documents, length: int):
        documents = [np.asarray(d, np.int32) for d in documents]
        self._inputs = _joined([np.concatenate([[tokenizers.BOS_ID], d]) for d in documents])
        self._targets = _joined([np.concatenate([d, [tokenizers.EOS_ID]]) for d in documents])
        self._documents = _joined([np.full(len(d) + 1, i) for i, d in enumerate(documents)])
        if len(self._inputs) < length:
            raise ValueError(
                f"The split's documents make {len(self._inputs)} (input, target) pairs, fewer "
                f"than one window of max_length = {length}."
            )
        self._length = length

    def __len__(self):
        return len(self._inputs) // self._length

    def __getitem__(self, index):
        window = slice(index * self._length, (index + 1) * self._length)
        documents = self._documents[window]
        new_piece = np.concatenate([[True], documents[1:] != documents[:-1]])
        starts = np.flatnonzero(new_piece)
        piece_start = starts[np.cumsum(new_piece) - 1]
        return {
            "inputs": self._inputs[window],
            "targets": self._targets[window],
            "segment_ids": np.cumsum(new_piece).astype(np.int32),
            "positions": (np.arange(self._length) - piece_start).astype(np.int32),
        }


def _joined(arrays) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)


def _documents(source, encode) -> list:
    """The token ids `[n]` of every document of a split."""
    return [encode(source[i])["tokens"] for i in range(len(source))]


def _token_stream(documents) -> np.ndarray:
    """All documents of a split, each followed by EOS, as one int32 [num_tokens] array."""
    eos = np.asarray([tokenizers.EOS_ID], np.int32)
    return _joined([part for document in documents for part in (document, eos)])


# Stands for an example that is not there: a padding row of a batch. (grain drops None.)
_PADDING_ROW = {}


def _host_shard(
    dataset: grain.MapDataset, process_index: int, process_count: int, pad_to_equal: bool
) -> grain.MapDataset:
    """Examples process_index, process_index + process_count, ... Every host's shard has the same
    length: filled up with padding rows if pad_to_equal, else cut to the shortest."""
    if not pad_to_equal:
        usable = len(dataset) - len(dataset) % process_count
        return dataset[:usable][process_index::process_count]
    shard_length = -(-len(dataset) // process_count)
    return grain.MapDataset.range(shard_length).map(
        lambda i: (
            dataset[process_index + i * process_count]
            if process_index + i * process_count < len(dataset)
            else _PADDING_ROW
        )
    )


def _padded_length(longest: int, max_length: int, buckets) -> int:
    """The smallest bucket (or max_length) that holds `longest` tokens."""
    for bucket in buckets or ():
        if longest <= bucket:
            return bucket
    return max_length


def _stack_padded(rows, length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if row is not None:  # None: a padding row
            row = row[:length]
            out[i, : len(row)] = row
    return out


class _PadBatch:
    """A list of encoded examples (_PADDING_ROW: a row of zeros) -> a batch of batch_size rows."""

    def __init__(self, task: str, batch_size: int, config):
        self.task, self.batch_size = task, batch_size
        self.max_length = config.max_length
        self.max_target_length = config.get("max_target_length")
        self.buckets = config.length_buckets

    def _pad(self, rows, key, max_length):
        longest = max((min(len(r[key]), max_length) for r in rows if r), default=1)
        length = _padded_length(longest, max_length, self.buckets)
        return _stack_padded([r[key] if r else None for r in rows], length)

    def __call__(self, examples):
        rows = list(examples) + [_PADDING_ROW] * (self.batch_size - len(examples))
        batch = {"inputs": self._pad(rows, "inputs", self.max_length)}
        if self.task == spec.CLASSIFICATION:
            batch["targets"] = np.asarray(
                [r["targets"] if r else _PADDING_CLASS for r in rows], np.int32
            )
        elif self.task == spec.SEQ2SEQ:
            batch["targets"] = self._pad(rows, "targets", self.max_target_length)
        else:  # language modelling: windows have one length already
            for key in ("targets",) + _PACKED_KEYS:
                if key == "targets" or any(key in r for r in rows):
                    batch[key] = self._pad(rows, key, self.max_length)
        return batch


class _SortedBatches(FlatMapTransform):
    """A window of examples -> batches of examples of similar length (sorted by input length).

    Padding rows go last; with drop_remainder, a last batch that is not full is dropped.
    """

    def __init__(self, pad_batch: _PadBatch, batches_per_window: int, drop_remainder: bool):
        self.pad_batch = pad_batch
        self.max_fan_out = batches_per_window
        self.drop_remainder = drop_remainder

    def flat_map(self, examples):
        size = self.pad_batch.batch_size
        real = sorted((e for e in examples if e), key=lambda e: len(e["inputs"]))
        ordered = real + [_PADDING_ROW] * (len(examples) - len(real))
        if self.drop_remainder:
            ordered = ordered[: len(ordered) - len(ordered) % size]
        return [self.pad_batch(ordered[i : i + size]) for i in range(0, len(ordered), size)]


def make_dataset(
    data_config,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool | None = None,
    drop_remainder: bool | None = None,
    data_dir: str | None = None,
) -> grain.IterDataset:
    """The grain dataset of one split for one host; `iter()` it (or use `make_iterator`).

    Args:
      data_config: see transformer.data.registry (name, config, max_length, ...).
      split: 'train', 'validation' or 'test'.
      global_batch_size: rows per step over all hosts; must divide by process_count.
      seed: shuffling seed; each epoch is shuffled differently, the same way on every run.
      process_index, process_count: this host and the number of hosts (jax.process_index(),
        jax.process_count()); each host reads a disjoint shard.
      num_epochs: None repeats forever (training); 1 for evaluation.
      shuffle: default: shuffle the 'train' split only.
      drop_remainder: drop a last, incomplete batch instead of padding it. Default: pad.
      data_dir: where TFDS data lives and is prepared on first use (default ~/tensorflow_datasets
        or $TFDS_DATA_DIR).
    """
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}, so every host gets the same batch size."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count}).")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")
    config = registry.resolve(data_config)
    dataset_spec = registry.get_spec(config.name)
    builder = registry.prepare(config, data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"Unknown split {split!r} of {config.name}; allowed: {sorted(builder.info.splits)}."
        )
    source = builder.as_data_source(split=split)
    encode = dataset_spec.make_encoder(builder, config)
    batch_size = global_batch_size // process_count
    shuffle = split == "train" if shuffle is None else shuffle
    drop_remainder = bool(drop_remainder)

    if dataset_spec.task == spec.LANGUAGE_MODELLING and config.pack_documents:
        ds = grain.MapDataset.source(PackedWindows(_documents(source, encode), config.max_length))
    elif dataset_spec.task == spec.LANGUAGE_MODELLING:
        ds = grain.MapDataset.source(
            _TokenWindows(_token_stream(_documents(source, encode)), config.max_length)
        )
    else:
        ds = grain.MapDataset.source(source)
    ds = _host_shard(
        ds, process_index, process_count, pad_to_equal=num_epochs is not None and not drop_remainder
    )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if dataset_spec.task != spec.LANGUAGE_MODELLING:
        ds = ds.map(lambda example: encode(example) if example else _PADDING_ROW)

    # Batches are cut from windows of sort_window batches, sorted by length within the window.
    ds = ds.batch(batch_size * config.sort_window, batch_fn=list)
    iter_ds = FlatMapIterDataset(
        ds.to_iter_dataset(
            grain.ReadOptions(
                num_threads=config.read_threads, prefetch_buffer_size=2 * config.read_threads
            )
        ),
        _SortedBatches(
            _PadBatch(dataset_spec.task, batch_size, config), config.sort_window, drop_remainder
        ),
    )
    if config.worker_count:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return iter_ds


def make_iterator(data_config, split: str, **kwargs) -> grain.DatasetIterator:
    """`iter(make_dataset(...))`: a checkpointable iterator (get_state / set_state)."""
    return iter(make_dataset(data_config, split, **kwargs))
