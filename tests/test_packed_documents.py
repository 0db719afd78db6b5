"""Packed documents through the models: a row holding several documents, with their segment ids
and per-document positions, gives each document the logits (and gradients) it gets alone."""

import jax
import ml_collections
import numpy as np
import pytest

from transformer.data import pipeline
from transformer.modules.models import DecoderLM, Encoder, TransformerConfig
from transformer.training import config_schema, loop, tasks

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
        ("sinusoidal", "causal", "dense"),
        ("learned", "sliding_window", "dense"),
        ("rotary", "causal", "dense"),
        ("alibi", "sliding_window", "dense"),
        ("rotary", "sliding_window", "block_sparse"),
        ("alibi", "causal", "block_sparse"),
    ],
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


def test_one_training_step_on_packed_shakespeare_keeps_documents_apart(tmp_path):
    config = config_schema.base_config()
    config.task = "language_modelling"
    config.model = ml_collections.ConfigDict(
        dict(
            name="decoder_lm",
            d_model=16,
            num_heads=2,
            d_ff=32,
            num_layers=1,
            pattern="causal",
            positional="rotary",
            dropout_rate=0.0,
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(name="shakespeare", max_length=LENGTH, pack_documents=True)
    )
    config.data_dir = str(tmp_path / "tfds")
    config.global_batch_size = 8
    config.num_train_steps = 1
    config.eval_every_steps = config.log_every_steps = config.checkpoint_every_steps = 1
    config.eval_steps = 1
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert result.summary["status"] == "completed"
    assert np.isfinite(result.summary["final"]["eval/loss"])

    # The trained model, called by the task on a packed batch, keeps its documents apart.
    model = loop.build_model(loop.with_data_fields(config))
    params = {"params": result.state.params}
    alone = _packed_and_alone()[-1]
    windows = pipeline.PackedWindows([row[:n] for row, n in zip(alone, DOCUMENTS)], LENGTH)
    batch = {key: value[None] for key, value in windows[0].items()}
    task = tasks.get_task("language_modelling")
    apply = jax.jit(model.apply)
    packed_logits = apply(params, *task.model_inputs(batch))
    segment_ids, positions = batch["segment_ids"], batch["positions"]
    first = int((segment_ids[0] == 1).sum())
    alone = apply(params, batch["inputs"][:, :first])
    np.testing.assert_allclose(packed_logits[:, :first], alone, **TOLERANCE)
    second = segment_ids[0] == 2
    alone = apply(params, batch["inputs"][:, second])
    np.testing.assert_allclose(packed_logits[:, second], alone, **TOLERANCE)
    assert positions[0, second][0] == 0 and second.sum() == DOCUMENTS[1] + 1
