"""BLEU of a translation model: decode an evaluation set, detokenize, score with sacrebleu.

The seq2seq task's evaluator (`transformer.training.tasks`) calls `evaluate_translation` after
each evaluation when `config.translation_eval` is set, and the loop logs what it returns beside
the loss: "bleu" over the whole
set and "bleu_len_<low>_<high>" for the sentences whose source has low <= words < high (the last
bucket is "bleu_len_<low>_up"), as in Figure 2 of Bahdanau et al. (2015), which plots BLEU
against sentence length. A bucket without sentences is left out, not scored 0.

config.translation_eval fields (an empty ConfigDict: no decoding):
  strategy        "greedy" or "beam" (transformer.decoding)
  beam_size       beam only; default 4
  alpha           beam only: GNMT length penalty; default 0.6
  max_decode_len  tokens decoded per sentence at most; 0 (default): the data's max_target_length
  bucket_edges    ascending source lengths in words (whitespace-separated, after detokenizing);
                  default (10, 20, 30, 40, 50): buckets 0-10, 10-20, ..., 50 and up
  num_examples    sentences to translate, from the start of the split; 0 (default): all
  num_alignment_plots  for models with attention over the source (the recurrent ones with
                  attention, and the transformer: its last decoder layer's cross-attention,
                  averaged over heads): heatmaps of the first n sentences of at most 30 source
                  tokens, written to the run's workdir; default 0

Decoding runs on the host, not data-parallel: the replicated parameters are fetched and every
process translates the whole set on its first local device, so every process computes the same
BLEU without collectives. That is fine for evaluation sets of a few thousand sentences, as here;
a larger one would want the sentences split across devices.
"""

import os

import jax
import ml_collections
import numpy as np
import sacrebleu

from transformer import decoding
from transformer.modules.models import EncoderDecoder
from transformer.token_ids import EOS_ID, PAD_ID
from transformer.training import parallel

DEFAULTS = dict(
    strategy="greedy",
    beam_size=4,
    alpha=0.6,
    max_decode_len=0,
    bucket_edges=(10, 20, 30, 40, 50),
    num_examples=0,
    num_alignment_plots=0,
)
STRATEGIES = ("greedy", "beam")
SENTENCEPIECE_DATASETS = ("bible_en_es",)
ALIGNMENT_MAX_SOURCE_TOKENS = 30  # longer sentences make unreadable heatmaps


def check(fields, data_config):
    """`config.translation_eval` resolved, checked at start-up against the data set it decodes;
    a ValueError names a bad field."""
    from transformer.data import registry

    settings = resolve(fields)
    name = registry.resolve(data_config).name
    if name not in SENTENCEPIECE_DATASETS:
        raise ValueError(
            f"translation_eval detokenizes with the data's SentencePiece model; data set "
            f"{name!r} has none. Allowed: {list(SENTENCEPIECE_DATASETS)}."
        )
    return settings


def metric_names(settings):
    """What `evaluate_translation` can return: "bleu" and the length buckets' names."""
    return ["bleu"] + bucket_names(settings.bucket_edges)


def resolve(fields, section="translation_eval", defaults=None):
    """`config.<section>` with its defaults (DEFAULTS) filled in; a ValueError names a bad field.

    Shared with the evaluators whose fields are these (transformer/evaluation/exact_match.py)."""
    defaults = DEFAULTS if defaults is None else defaults
    if hasattr(fields, "to_dict"):
        fields = fields.to_dict()
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {section} field(s) {unknown}; allowed: {sorted(defaults)}.")
    resolved = ml_collections.ConfigDict({**defaults, **fields})
    if resolved.strategy not in STRATEGIES:
        raise ValueError(f"{section}.strategy={resolved.strategy!r}; allowed: {list(STRATEGIES)}.")
    edges = tuple(resolved.bucket_edges)
    if not edges or list(edges) != sorted(set(edges)) or edges[0] < 1:
        raise ValueError(
            f"{section}.bucket_edges must be ascending positive source lengths; got {edges}."
        )
    resolved.bucket_edges = edges
    for name in ("beam_size",):
        if resolved[name] < 1:
            raise ValueError(f"{section}.{name} must be >= 1; got {resolved[name]}.")
    for name in ("max_decode_len", "num_examples", "num_alignment_plots"):
        if resolved[name] < 0:
            raise ValueError(f"{section}.{name} must be >= 0; got {resolved[name]}.")
    return resolved


def bucket_names(edges, prefix="bleu_len"):
    """Metric names of the buckets [0, e1), [e1, e2), ..., [e_last, inf)."""
    lows = (0,) + tuple(edges)
    highs = tuple(str(e) for e in edges) + ("up",)
    return [f"{prefix}_{low}_{high}" for low, high in zip(lows, highs)]


def bucket_of(lengths, edges):
    """Bucket index of each length: 0 for [0, e1), ..., len(edges) for [e_last, inf)."""
    return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right")


def bleu_by_length(hypotheses, references, source_lengths, edges):
    """Corpus BLEU overall and per source-length bucket.

    hypotheses, references: detokenized strings, one per sentence; source_lengths: the length
    (e.g. in words) by which a sentence is bucketed. Returns {"bleu": ..., "bleu_len_0_10": ...}
    with the buckets that hold at least one sentence.
    """
    if not len(hypotheses) == len(references) == len(source_lengths):
        raise ValueError(
            f"{len(hypotheses)} hypotheses, {len(references)} references and "
            f"{len(source_lengths)} source lengths: they must match."
        )
    if not hypotheses:
        raise ValueError("no sentences to score.")
    buckets = bucket_of(source_lengths, edges)
    scores = {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score}
    for bucket, name in enumerate(bucket_names(edges)):
        members = np.flatnonzero(buckets == bucket)
        if members.size:
            scores[name] = sacrebleu.corpus_bleu(
                [hypotheses[i] for i in members], [[references[i] for i in members]]
            ).score
    return scores


def until_eos(tokens):
    """Generated ids `[max_len]` -> a list up to and including the first EOS (or all of them)."""
    tokens = [int(t) for t in tokens if t != PAD_ID]
    return tokens[: tokens.index(EOS_ID) + 1] if EOS_ID in tokens else tokens


def translate(model, params, batches, settings):
    """(sources, references, hypotheses): token id lists of every real row of `batches`.

    batches: host batches {"inputs": [batch, src_len], "targets": [batch, tgt_len]}; rows of
    padding only (a last, filled-up batch) are skipped.
    """
    options = {}
    if settings.strategy == "beam":
        options = dict(beam_size=settings.beam_size, alpha=settings.alpha)
    sources, references, hypotheses = [], [], []
    for batch in batches:
        inputs = np.asarray(batch["inputs"])
        output = decoding.generate(
            model,
            {"params": params},
            inputs,
            eos_id=EOS_ID,
            max_len=settings.max_decode_len,
            strategy=settings.strategy,
            **options,
        )
        output = np.asarray(output)
        for row in np.flatnonzero(np.any(inputs != PAD_ID, axis=1)):
            sources.append(until_eos(inputs[row]))
            references.append(until_eos(batch["targets"][row]))
            hypotheses.append(until_eos(output[row]))
            if settings.num_examples and len(sources) == settings.num_examples:
                return sources, references, hypotheses
    return sources, references, hypotheses


def plot_alignments(model, params, names, sources, hypotheses, count, directory):
    """Heatmaps of the first `count` sentences of at most ALIGNMENT_MAX_SOURCE_TOKENS tokens.

    names: maps a list of token ids to a list of strings (the labels)."""
    # matplotlib only when plotting
    from transformer.evaluation.alignment import alignment_weights, plot_alignment

    os.makedirs(directory, exist_ok=True)
    short = [i for i, s in enumerate(sources) if len(s) <= ALIGNMENT_MAX_SOURCE_TOKENS]
    for index in short[:count]:
        source, target = np.asarray([sources[index]]), np.asarray([hypotheses[index]])
        plot_alignment(
            alignment_weights(model, params, source, target),
            names(sources[index]),
            names(hypotheses[index]),
            os.path.join(directory, f"sentence_{index}.png"),
        )


def has_attention_weights(model):
    """The recurrent models with attention and the encoder-decoder transformer."""
    return isinstance(model, EncoderDecoder) or getattr(model, "attention", "none") != "none"


def decode_split(model, host_params, resolved_data, split, settings, *, batch_size, data_dir):
    """(sources, references, hypotheses) of `translate` over `split` of a resolved data config,
    read once in order on this process. host_params: fetched (`parallel.fetch`)."""
    from transformer.data import make_iterator

    batches = make_iterator(
        resolved_data,
        split,
        global_batch_size=batch_size,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
        data_dir=data_dir or None,
    )
    return translate(model, host_params, batches, settings)


def should_plot(settings, plot_dir, model):
    """Alignment heatmaps are asked for, have somewhere to go, and the model has attention."""
    return bool(
        settings.num_alignment_plots
        and plot_dir
        and has_attention_weights(model)
        and jax.process_index() == 0
    )


def evaluate_translation(
    model, params, data_config, split, fields, *, batch_size, data_dir, plot_dir=None
):
    """BLEU of `model` translating `split` of a SentencePiece seq2seq data set (bible_en_es).

    params: the replicated parameters (fetched to the host here). fields: config.translation_eval.
    plot_dir: where the alignment heatmaps go (when asked for and the model has attention).
    Returns {"bleu": ..., "bleu_len_<low>_<high>": ...}.
    """
    from transformer.data import registry
    from transformer.data.bible_en_es import tokenizer as sentencepiece_of

    settings = check(fields, data_config)
    resolved = registry.resolve(data_config)
    if not settings.max_decode_len:
        settings.max_decode_len = resolved.max_target_length
    tokenizer = sentencepiece_of(registry.prepare(resolved, data_dir or None))
    params = parallel.fetch(params)
    sources, references, hypotheses = decode_split(
        model, params, resolved, split, settings, batch_size=batch_size, data_dir=data_dir
    )
    source_words = [len(tokenizer.decode(s).split()) for s in sources]
    scores = bleu_by_length(
        [tokenizer.decode(h) for h in hypotheses],
        [tokenizer.decode(r) for r in references],
        source_words,
        settings.bucket_edges,
    )
    if should_plot(settings, plot_dir, model):
        names = lambda ids: [tokenizer.processor.id_to_piece(i) for i in ids]
        plot_alignments(
            model, params, names, sources, hypotheses, settings.num_alignment_plots, plot_dir
        )
    return scores
