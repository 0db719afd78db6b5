"""The recurrent encoder-decoder: shapes, padding, the bottleneck, attention weights, stepping."""

import functools
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from transformer import decoding
from transformer.evaluation.alignment import plot_alignment, translate_and_plot
from transformer.modules.models import build_model
from transformer.modules.rnn import RNNSeq2Seq, build_rnn_seq2seq
from transformer.training import config_schema, loop

VOCAB = 13
EOS = 2
# Lengths 5, 3 and 2: every row but the first is padded.
SOURCE = jnp.array([[5, 6, 7, 8, 2], [9, 4, 2, 0, 0], [7, 2, 0, 0, 0]], jnp.int32)
TARGET = jnp.array([[5, 6, 2, 0], [4, 4, 9, 2], [2, 0, 0, 0]], jnp.int32)

CONFIGS = {
    "none-lstm": dict(attention="none"),
    "bahdanau-gru-bidirectional": dict(
        attention="bahdanau", cell="gru", bidirectional=True, dropout_rate=0.3
    ),
    "luong-dot-bidirectional-2-layers": dict(
        attention="luong", score="dot", bidirectional=True, num_layers=2
    ),
    "luong-concat-optimized-lstm-no-input-feeding": dict(
        attention="luong", score="concat", cell="optimized_lstm", input_feeding=False
    ),
}
# The 'general' score is tested by the overfitting test and by test_generate_... below.
ATTENTION_CONFIGS = [name for name in CONFIGS if not name.startswith("none")]


@functools.cache
def make(name, **overrides):
    """A model and random parameters of the shapes `init` gives.

    The properties tested here hold for any parameters. Drawing them directly skips compiling
    Flax's orthogonal initialiser (a QR per recurrent kernel, compiled by XLA for each model);
    the overfitting test below uses the real `init`.
    """
    model = RNNSeq2Seq(
        vocab_size=VOCAB,
        embed_dim=8,
        hidden_dim=16,
        attention_dim=8,
        **{**CONFIGS[name], **overrides},
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), SOURCE, TARGET)
    rng = np.random.default_rng(0)
    return model, jax.tree.map(
        lambda leaf: jnp.asarray(0.5 * rng.normal(size=leaf.shape), leaf.dtype), shapes
    )


# The tests that compare outputs(name) run in one worker process, so each config compiles once.
OUTPUTS_GROUP = pytest.mark.xdist_group("test_rnn outputs")


@functools.cache
def outputs(name):
    """Everything the per-config tests compare, computed in one jitted call (one compile)."""
    model, variables = make(name)

    @jax.jit
    def run(variables):
        logits, weights = (
            model.apply(variables, SOURCE, TARGET, return_attention=model.attention != "none"),
            None,
        )
        if model.attention != "none":
            logits, weights = logits
        padded = model.apply(
            variables, jnp.pad(SOURCE, ((0, 0), (0, 3))), jnp.pad(TARGET, ((0, 0), (0, 2)))
        )
        state = model.apply(variables, SOURCE, method=model.init_decode_state)
        token, stepped = jnp.full((3,), model.bos_id), []
        for t in range(TARGET.shape[1]):
            step_logits, state = model.apply(variables, state, token, method=model.decode_step)
            stepped.append(step_logits)
            token = TARGET[:, t]
        return dict(logits=logits, padded=padded, stepped=jnp.stack(stepped, 1), weights=weights)

    return run(variables)


@OUTPUTS_GROUP
@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_teacher_forcing_equals_step_by_step(name):
    out = outputs(name)
    assert out["logits"].shape == (3, 4, VOCAB) and out["logits"].dtype == jnp.float32
    np.testing.assert_allclose(out["stepped"], out["logits"], rtol=1e-5, atol=1e-6)


def test_runs_outside_jit_too():
    model, variables = make("none-lstm")
    np.testing.assert_allclose(
        model.apply(variables, SOURCE, TARGET), outputs("none-lstm")["logits"], rtol=1e-5, atol=1e-6
    )


@OUTPUTS_GROUP
@pytest.mark.parametrize("name", CONFIGS)
def test_padding_does_not_change_outputs(name):
    out = outputs(name)
    np.testing.assert_allclose(
        out["padded"][:, : TARGET.shape[1]], out["logits"], rtol=1e-5, atol=1e-6
    )


@OUTPUTS_GROUP
@pytest.mark.parametrize("name", ATTENTION_CONFIGS)
def test_attention_weights_sum_to_one_over_real_source_positions(name):
    weights = np.asarray(outputs(name)["weights"])
    assert weights.shape == (3, TARGET.shape[1], SOURCE.shape[1])
    real = np.asarray(SOURCE != 0)[:, None, :]
    np.testing.assert_array_equal(np.where(real, 0.0, weights), 0.0)  # exactly 0 on padding
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert (weights[np.broadcast_to(real, weights.shape)] > 0).all()


def memory_gradients(name):
    """Gradients of the teacher-forced logits w.r.t. the encoder memory: all states, final."""
    model, variables = make(name)
    decoder_inputs = jnp.pad(TARGET, ((0, 0), (1, 0)), constant_values=model.bos_id)[:, :-1]
    probe = jnp.asarray(
        np.random.default_rng(1).normal(size=(3, TARGET.shape[1], VOCAB)), jnp.float32
    )

    @jax.jit
    def gradients():
        memory = model.apply(variables, SOURCE, method=model.encode)

        def loss(states, final):
            logits, _ = model.apply(
                variables,
                memory._replace(states=states, final=final),
                decoder_inputs,
                method=model.decode,
            )
            return jnp.sum(logits * probe)

        return jax.grad(loss, argnums=(0, 1))(memory.states, memory.final)

    return gradients()


def test_bottleneck_decoder_sees_only_the_final_encoder_state():
    states_grad, final_grad = memory_gradients("none-lstm")
    np.testing.assert_array_equal(states_grad, 0.0)  # exactly: no path from any state
    assert all(np.abs(leaf).min(axis=-1).max() > 0 for leaf in jax.tree.leaves(final_grad))


@pytest.mark.parametrize("name", ["bahdanau-gru-bidirectional", "luong-dot-bidirectional-2-layers"])
def test_attention_decoders_read_every_real_state_and_no_padding(name):
    states_grad, _ = memory_gradients(name)
    magnitude = np.abs(np.asarray(states_grad)).sum(-1)  # [batch, src_len]
    real = np.asarray(SOURCE != 0)
    assert (magnitude[real] > 0).all()
    np.testing.assert_array_equal(magnitude[~real], 0.0)


def test_bidirectional_encoder_reads_forward_and_backward():
    model, variables = make("luong-dot-bidirectional-2-layers", num_layers=1)
    half = model.hidden_dim // 2
    encode = jax.jit(lambda source: model.apply(variables, source, method=model.encode))
    memory, changed = encode(SOURCE), encode(SOURCE.at[0, 2].set(11))
    states, other = np.asarray(memory.states[0]), np.asarray(changed.states[0])
    # Forward states before position 2 and backward states after it never saw it.
    np.testing.assert_array_equal(states[:2, :half], other[:2, :half])
    np.testing.assert_array_equal(states[3:, half:], other[3:, half:])
    assert (np.abs(states[2:, :half] - other[2:, :half]).sum(-1) > 0).all()
    assert (np.abs(states[:3, half:] - other[:3, half:]).sum(-1) > 0).all()
    # The final carry: forward after the last real token, backward after the first one.
    ((_, final_h),) = memory.final
    lengths = np.asarray((SOURCE != 0).sum(-1))
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(final_h[row, :half], memory.states[row, length - 1, :half])
        np.testing.assert_allclose(final_h[row, half:], memory.states[row, 0, half:])
    np.testing.assert_array_equal(np.asarray(memory.states)[np.asarray(SOURCE == 0)], 0.0)
    # A source of padding only: zero states, and the zero carry to start the decoder from.
    empty = encode(SOURCE.at[2].set(0))
    np.testing.assert_array_equal(empty.states[2], 0.0)
    for leaf in jax.tree.leaves(empty.final):
        np.testing.assert_array_equal(leaf[2], 0.0)


def test_dropout_follows_the_rng_and_is_off_at_evaluation():
    name = "bahdanau-gru-bidirectional"  # dropout_rate 0.3
    model, variables = make(name)
    out = outputs(name)
    train = jax.jit(
        lambda rng: model.apply(variables, SOURCE, TARGET, train=True, rngs={"dropout": rng})
    )
    same_rng, same_rng_again = train(jax.random.key(1)), train(jax.random.key(1))
    other_rng = train(jax.random.key(2))
    np.testing.assert_array_equal(same_rng, same_rng_again)
    assert not np.allclose(same_rng, other_rng)
    assert not np.allclose(same_rng, out["logits"])  # train=False: no dropout
    # Evaluation outputs agree with step-by-step decoding, which has no rng at all.
    np.testing.assert_allclose(out["stepped"], out["logits"], rtol=1e-5, atol=1e-6)


def test_generate_greedy_and_beam_of_one_agree_with_decode_step():
    model, variables = make("luong-dot-bidirectional-2-layers", score="general")
    greedy = decoding.generate(model, variables, SOURCE, max_len=6, eos_id=EOS)
    beam = decoding.generate(
        model, variables, SOURCE, max_len=6, eos_id=EOS, strategy="beam", beam_size=1, alpha=0.0
    )
    np.testing.assert_array_equal(greedy, beam)

    @jax.jit
    def argmax_by_hand(variables):
        state = model.apply(variables, SOURCE, method=model.init_decode_state)
        token, tokens = jnp.full((3,), model.bos_id), []
        for _ in range(6):
            logits, state = model.apply(variables, state, token, method=model.decode_step)
            token = jnp.argmax(logits.at[:, 0].set(-jnp.inf), -1)  # padding is never emitted
            tokens.append(token)
        return jnp.stack(tokens, 1)

    by_hand = np.asarray(argmax_by_hand(variables))
    finished_before = np.cumsum(by_hand == EOS, axis=1) - (by_hand == EOS) > 0
    np.testing.assert_array_equal(np.where(finished_before, 0, by_hand), greedy)
    with pytest.raises(ValueError, match="strategy"):
        decoding.generate(model, variables, SOURCE, max_len=6, eos_id=EOS, strategy="nucleus")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(attention="transformer"), "attention"),
        (dict(cell="rnn"), "cell"),
        (dict(attention="bahdanau", score="dot"), "luong"),
        (dict(attention="luong", score="cosine"), "score"),
        (dict(bidirectional=True, hidden_dim=15), "even"),
        (dict(bos_id=0), "bos_id"),
        (dict(num_heads=4), "num_heads"),
    ],
)
def test_bad_configs_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        build_rnn_seq2seq({"vocab_size": VOCAB, **fields})


def test_return_attention_without_attention_is_an_error():
    model, variables = make("none-lstm")
    with pytest.raises(ValueError, match="no attention"):
        model.apply(variables, SOURCE, TARGET, return_attention=True)


def test_overfits_a_toy_reversal_task_and_plots_its_anti_diagonal_alignment(tmp_path):
    """A few hundred Adam steps on 'reverse the sequence' learn it, and the alignment is the
    anti-diagonal: target i looks at source n - 1 - i."""
    model = RNNSeq2Seq(
        vocab_size=VOCAB,
        embed_dim=16,
        hidden_dim=32,
        attention_dim=16,
        attention="luong",
        score="general",
        bidirectional=True,
    )
    rng = np.random.default_rng(0)
    symbols = rng.integers(3, VOCAB, size=(64, 5))
    inputs = jnp.asarray(np.concatenate([symbols, np.full((64, 1), EOS)], 1), jnp.int32)
    targets = jnp.asarray(np.concatenate([symbols[:, ::-1], np.full((64, 1), EOS)], 1), jnp.int32)
    optimizer = optax.adam(1e-2)

    def loss_fn(params):
        logits = model.apply({"params": params}, inputs, targets)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def train(rng):
        params = model.init(rng, inputs, targets)["params"]

        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, 300)
        return losses, params

    losses, params = train(jax.random.key(0))
    assert losses[0] > 2.0 and losses[-1] < 0.05, (losses[0], losses[-1])
    # A new sentence, translated by greedy decoding and pictured.
    names = lambda ids: [f"<{i}>" if i < 3 else "abcdefghij"[i - 3] for i in ids]
    translation, weights = translate_and_plot(
        model,
        {"params": params},
        [3, 9, 4, 12, 7, EOS, 0],
        tmp_path / "reverse.png",
        max_len=8,
        eos_id=EOS,
        names=names,
    )
    np.testing.assert_array_equal(translation, [7, 12, 4, 9, 3, EOS])
    assert weights.shape == (6, 7)
    np.testing.assert_array_equal(weights[:5, :5].argmax(-1), [4, 3, 2, 1, 0])  # anti-diagonal
    assert (tmp_path / "reverse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alignment_plot_writes_a_png_of_the_expected_size(tmp_path):
    weights = np.random.default_rng(0).dirichlet(np.ones(7), size=5)
    path = plot_alignment(
        np.pad(weights, ((0, 2), (0, 3))),
        list("abcdefg"),
        list("vwxyz"),
        tmp_path / "alignment.png",
        dpi=100,
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    # figsize (1.5 + 0.35 * 7, 1.2 + 0.35 * 5) inches at 100 dpi.
    assert (width, height) == (395, 295)
    with pytest.raises(ValueError, match="do not fit"):
        plot_alignment(weights, list("abcdefgh"), list("vwxyz"), tmp_path / "bad.png")


def test_build_model_builds_the_rnn_from_the_registry_and_refuses_unknown_fields():
    model = build_model(
        {
            "name": "rnn_seq2seq",
            "vocab_size": VOCAB,
            "attention": "bahdanau",
            "cell": "gru",
            "max_len": 9,
        }
    )
    assert isinstance(model, RNNSeq2Seq) and (model.attention, model.cell) == ("bahdanau", "gru")
    assert model.max_decode_len == 9
    with pytest.raises(ValueError, match=r"has no field\(s\) \['num_layer'\]"):
        build_model({"name": "rnn_seq2seq", "vocab_size": VOCAB, "num_layer": 2})
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        build_model({"name": "rnn_seq2seq", "vocab_size": VOCAB, "max_len": 0})


def test_trains_through_the_shared_loop_on_a_seq2seq_data_set(tmp_path):
    """train_and_evaluate builds the RNN from its config (vocab_size and max_len from the data,
    as for a transformer), calls it the seq2seq task's way, and learns."""
    config = config_schema.base_config()
    config.task = "seq2seq"
    config.model = ml_collections.ConfigDict(
        dict(name="rnn_seq2seq", embed_dim=16, hidden_dim=32, attention_dim=16, attention="luong")
    )
    config.data = ml_collections.ConfigDict(dict(name="copy_reverse", config="tiny"))
    config.data_dir = str(tmp_path / "tfds")
    config.global_batch_size = 16
    config.num_train_steps = 80
    config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 80
    config.eval_steps = 2
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 0
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert result.summary["status"] == "completed" and result.summary["step"] == 80
    # Targets are 3 to 12 of 8 symbols, then EOS: knowing only token frequencies costs about
    # 2.2 nats per target, so less needs the source (this run: 1.42).
    assert result.summary["final"]["eval/loss"] < 1.9, result.summary["final"]
