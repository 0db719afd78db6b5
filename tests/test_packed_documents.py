"""Packed documents through the models: a row holding several documents, with their segment ids
and per-document positions, gives each document the logits (and gradients) it gets alone."""

import jax
import numpy as np
import pytest

from transformer.modules.models import DecoderLM, Encoder, TransformerConfig

VOCAB, LENGTH = 32, 16
DOCUMENTS = (5, 7, 3)  # packed into one row of LENGTH, the last position padding
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _config(**fields):
    base = dict(
        vocab_size=VOCAB,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=1,
        max_len=LENGTH,
        dropout_rate=0.0,
        norm_position="pre",
        implementation="dense",
    )
    return TransformerConfig(**{**base, **fields})


def _packed_and_alone(seed=0):
    """The packed row `[1, LENGTH]` with its segment ids and positions, and the same documents
    one per row `[documents, LENGTH]`, each alone at positions 0.. and right-padded."""
    rng = np.random.default_rng(seed)
    documents = [rng.integers(1, VOCAB, size=n).astype(np.int32) for n in DOCUMENTS]
    packed = np.zeros((1, LENGTH), np.int32)
    segment_ids = np.zeros((1, LENGTH), np.int32)
    positions = np.zeros((1, LENGTH), np.int32)
    alone = np.zeros((len(documents), LENGTH), np.int32)
    start = 0
    for index, document in enumerate(documents):
        end = start + len(document)
        packed[0, start:end] = document
        segment_ids[0, start:end] = index + 1
        positions[0, start:end] = np.arange(len(document))
        alone[index, : len(document)] = document
        start = end
    return packed, segment_ids, positions, alone


def _unpack(packed_out, alone_out):
    """The packed row's outputs cut into documents, and each document's own outputs."""
    starts = np.cumsum((0,) + DOCUMENTS)
    got = [packed_out[0, s : s + n] for s, n in zip(starts, DOCUMENTS)]
    expected = [alone_out[i, :n] for i, n in enumerate(DOCUMENTS)]
    return np.concatenate(got), np.concatenate(expected)


@pytest.mark.parametrize(
    "positional, pattern, implementation",
    [
        (positional, pattern, "dense")
        for positional in ("sinusoidal", "learned", "rotary", "alibi")
        for pattern in ("causal", "sliding_window")
    ]
    + [("rotary", "sliding_window", "block_sparse"), ("alibi", "causal", "block_sparse")],
)
def test_a_packed_row_gives_each_document_its_own_logits(positional, pattern, implementation):
    options = {"left": 2} if pattern == "sliding_window" else {}
    model = DecoderLM(
        _config(
            positional=positional,
            pattern=pattern,
            pattern_options=options,
            implementation=implementation,
        )
    )
    packed, segment_ids, positions, alone = _packed_and_alone()
    params = jax.jit(model.init)(jax.random.key(0), alone)
    apply = jax.jit(model.apply)
    packed_logits = apply(params, packed, segment_ids=segment_ids, positions=positions)
    got, expected = _unpack(np.asarray(packed_logits), np.asarray(apply(params, alone)))
    np.testing.assert_allclose(got, expected, **TOLERANCE)
    # As one document, the packed row's later documents see the earlier ones: the test can fail.
    one_document = np.ones_like(segment_ids), np.arange(LENGTH)[None]
    unpacked = apply(params, packed, segment_ids=one_document[0], positions=one_document[1])
    unpacked, _ = _unpack(np.asarray(unpacked), np.asarray(apply(params, alone)))
    assert not np.allclose(unpacked, expected, **TOLERANCE)


def test_packed_gradients_equal_the_sum_of_each_documents_gradients():
    model = DecoderLM(_config(positional="rotary", pattern="causal"))
    packed, segment_ids, positions, alone = _packed_and_alone(seed=1)
    params = jax.jit(model.init)(jax.random.key(0), alone)
    weights = np.array(jax.random.normal(jax.random.key(2), (1, LENGTH, VOCAB)))
    weights[0, sum(DOCUMENTS) :] = 0
    # Each document alone is weighted as in the packed row.
    alone_weights = np.zeros((len(DOCUMENTS), LENGTH, VOCAB), np.float32)
    for index, (start, n) in enumerate(zip(np.cumsum((0,) + DOCUMENTS), DOCUMENTS)):
        alone_weights[index, :n] = weights[0, start : start + n]

    def packed_loss(params):
        logits = model.apply(params, packed, segment_ids=segment_ids, positions=positions)
        return (logits * weights).sum()

    def alone_loss(params):
        return (model.apply(params, alone) * alone_weights).sum()

    got = jax.jit(jax.grad(packed_loss))(params)
    expected = jax.jit(jax.grad(alone_loss))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), got, expected)


def test_a_packed_encoder_row_gives_each_document_its_own_outputs():
    encoder = Encoder(_config(positional="rotary", pattern="full"))
    packed, segment_ids, positions, alone = _packed_and_alone(seed=2)

    def embed(tokens):
        return jax.nn.one_hot(tokens, 16) * 3.0, tokens != 0

    params = jax.jit(encoder.init)(jax.random.key(0), *embed(alone))
    apply = jax.jit(encoder.apply)
    packed_out = apply(params, *embed(packed), segment_ids=segment_ids, positions=positions)
    got, expected = _unpack(np.asarray(packed_out), np.asarray(apply(params, *embed(alone))))
    np.testing.assert_allclose(got, expected, **TOLERANCE)
