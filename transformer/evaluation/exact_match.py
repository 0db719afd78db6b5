"""Exact match and token accuracy of decoded sequences, by source length (copy, reversal).

The seq2seq task's evaluator (`transformer.training.tasks`) calls `evaluate_exact_match` after
each evaluation when `config.exact_match_eval` is set. The model decodes every source of the
evaluation split by itself (greedy by default, `transformer.decoding`), and is scored against
the reference token by token, as Figure 2 of Bahdanau et al. (2015) plots quality against
source length but for a task whose answer is exactly right or not:

  exact_match         share of sequences decoded exactly (every token and the closing EOS)
  token_accuracy      share of reference tokens (the EOS included) matched at their position;
                      a decoded sequence that stops early misses the rest
  <metric>_len_<low>_<high>  the same over sources of low <= length < high tokens (the closing
                      EOS not counted); the last bucket is "<metric>_len_<low>_up". A bucket
                      without sequences is left out, not scored 0
  <metric>_beyond_train  the same over sources longer than any training source could be (the
                      training data's max_length, less the EOS that closes every source): how
                      far the model extrapolates. Left out when there are none

config.exact_match_eval has the fields of config.translation_eval (its `resolve`: strategy,
beam_size, alpha, max_decode_len, bucket_edges, num_examples, num_alignment_plots), with bucket
edges in source tokens. Any seq2seq data set will do: tokens are compared as ids, no tokenizer.
Decoding runs on the host, every process on the whole split, as translation's does.
"""

import numpy as np

from transformer.evaluation import translation
from transformer.token_ids import BOS_ID, EOS_ID, PAD_ID
from transformer.training import parallel

SECTION = "exact_match_eval"
DEFAULTS = {**translation.DEFAULTS, "bucket_edges": (8, 16, 32, 64)}
METRICS = ("exact_match", "token_accuracy")
RESERVED_NAMES = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>"}


def resolve(fields):
    """`config.exact_match_eval` with its defaults filled in; a ValueError names a bad field."""
    return translation.resolve(fields, SECTION, DEFAULTS)


def metric_names(settings):
    """What `evaluate_exact_match` can return."""
    names = list(METRICS) + [f"{m}_beyond_train" for m in METRICS]
    for metric in METRICS:
        names += translation.bucket_names(settings.bucket_edges, prefix=f"{metric}_len")
    return names


def source_length(source):
    """Tokens of a source (ids up to its EOS, as `translation.until_eos` gives), EOS not counted."""
    return len(source) - (1 if source and source[-1] == EOS_ID else 0)


def matches(reference, hypothesis):
    """(tokens of `reference` matched at their position, exact match 0 or 1)."""
    matched = sum(r == h for r, h in zip(reference, hypothesis))
    return matched, int(list(reference) == list(hypothesis))


def score(references, hypotheses, source_lengths, edges, longest_trained=None):
    """Exact match and token accuracy overall, per source-length bucket, and beyond training.

    references, hypotheses: token id lists, each up to and including its EOS; source_lengths:
    the length by which a sequence is bucketed; longest_trained: the longest source length in
    training (None: no "_beyond_train" metrics). Returns {"exact_match": ..., ...} as the
    module's docstring lists.
    """
    if not len(references) == len(hypotheses) == len(source_lengths):
        raise ValueError(
            f"{len(references)} references, {len(hypotheses)} hypotheses and "
            f"{len(source_lengths)} source lengths: they must match."
        )
    if not references:
        raise ValueError("no sequences to score.")
    counts = np.array([matches(r, h) for r, h in zip(references, hypotheses)])  # [n, 2]
    totals = np.array([len(r) for r in references])

    def scores_of(members, suffix):
        return {
            f"exact_match{suffix}": float(counts[members, 1].mean()),
            f"token_accuracy{suffix}": float(counts[members, 0].sum() / totals[members].sum()),
        }

    lengths = np.asarray(source_lengths)
    scores = scores_of(np.arange(len(references)), "")
    buckets = translation.bucket_of(lengths, edges)
    for bucket, name in enumerate(translation.bucket_names(edges, prefix="len")):
        members = np.flatnonzero(buckets == bucket)
        if members.size:
            scores.update(scores_of(members, f"_{name}"))
    if longest_trained is not None:
        beyond = np.flatnonzero(lengths > longest_trained)
        if beyond.size:
            scores.update(scores_of(beyond, "_beyond_train"))
    return scores


def token_names(ids):
    """Labels of token ids for alignment heatmaps: reserved ids by name, others by number."""
    return [RESERVED_NAMES.get(i, str(i)) for i in ids]


def evaluate_exact_match(
    model,
    params,
    data_config,
    split,
    settings,
    *,
    longest_trained,
    batch_size,
    data_dir,
    plot_dir=None,
):
    """Exact match and token accuracy of `model` decoding `split` of a seq2seq data set.

    params: the replicated parameters (fetched to the host here); settings: `resolve`d
    config.exact_match_eval; longest_trained: as `score` takes it. plot_dir: where alignment
    heatmaps go (when asked for and the model has attention). Returns `score`'s dict.
    """
    from transformer.data import registry

    resolved = registry.resolve(data_config)
    settings = settings.copy_and_resolve_references()
    if not settings.max_decode_len:
        settings.max_decode_len = resolved.max_target_length
    params = parallel.fetch(params)
    sources, references, hypotheses = translation.decode_split(
        model, params, resolved, split, settings, batch_size=batch_size, data_dir=data_dir
    )
    lengths = [source_length(s) for s in sources]
    scores = score(references, hypotheses, lengths, settings.bucket_edges, longest_trained)
    if translation.should_plot(settings, plot_dir, model):
        translation.plot_alignments(
            model,
            params,
            token_names,
            sources,
            hypotheses,
            settings.num_alignment_plots,
            plot_dir,
        )
    return scores
