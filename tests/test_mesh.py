"""Meshes from `config.mesh`: FSDP trains what data parallelism trains, with the parameters really
sharded; checkpoints move between meshes; a bad mesh or batch is a clear start-up error."""

import jax
import ml_collections
import numpy as np
import pytest
from test_parallel import run_steps
from test_train import toy_config, use_toy_setup

from transformer.training import loop, optimizer, parallel, tasks
from transformer.training.checkpoints import Checkpointer

# float32: the same sums in another order (gradients reduce-scattered rather than all-reduced).
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data_parallel():
    return run_steps("shard_map", jax.devices())


@pytest.mark.xdist_group("test_mesh data_parallel")  # one worker: the reference runs once
@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=4), dict(data=1, fsdp=8)])
def test_each_mesh_trains_the_data_parallel_losses_and_parameters(sizes, data_parallel):
    losses, params = run_steps("shard_map", jax.devices(), sizes)
    np.testing.assert_allclose(losses, data_parallel[0], **TOLERANCE)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **TOLERANCE), params, data_parallel[1]
    )
    assert losses[-1] < losses[0]


def transformer_setup():
    """A 2-layer decoder LM with dropout whose causal attention runs block-sparse (the CPU
    kernel, a custom call), its optimizer, a state and 2 batches `[16, 128]`."""
    from transformer.modules.models import build_model

    model = build_model(
        dict(
            name="decoder_lm",
            vocab_size=64,
            d_model=32,
            num_heads=2,
            d_ff=64,
            num_layers=2,
            max_len=128,
            pattern="causal",
            dropout_rate=0.1,
            implementation="block_sparse",
        )
    )
    task = tasks.get_task("language_modelling")
    opt = optimizer.make_optimizer(
        ml_collections.ConfigDict(
            dict(
                learning_rate=1e-2,
                warmup_steps=0,
                schedule="constant",
                weight_decay=0.01,
                b1=0.9,
                b2=0.98,
                eps=1e-9,
                grad_clip_norm=0.5,  # small enough to clip: the norm must be global
            )
        ),
        total_steps=2,
    )
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        inputs = rng.integers(1, 64, size=(16, 128)).astype(np.int32)
        targets = np.concatenate([inputs[:, 1:], np.zeros((16, 1), np.int32)], axis=1)
        targets[:5, 100:] = 0  # padding, unevenly over the devices
        batches.append({"inputs": inputs, "targets": targets})
    state = loop.make_init(model, task, opt)(0, batches[0])
    return model, task, opt, state, batches


def train_transformer(sizes):
    """(losses `[2]`, host parameters, the device state after the first step, the step)."""
    model, task, opt, state, batches = transformer_setup()
    mesh = parallel.make_mesh(sizes)
    step = parallel.distribute(
        loop.make_train_step(model, task, opt, label_smoothing=0.0, mesh=mesh), "shard_map", mesh
    )
    state = parallel.place(state, loop.state_specs(state, mesh), mesh, "shard_map")
    losses, first = [], None
    for batch in batches:
        device_batch = parallel.global_batch(batch, mesh, "shard_map")
        state, metrics = step(state, device_batch)
        first = first or (state, device_batch)
        sums = parallel.fetch(metrics)
        losses.append(sums["loss"][0] / sums["loss"][1])
    return np.array(losses), parallel.fetch(state.params), first, step


def test_fsdp_trains_a_transformer_like_data_parallelism_with_its_parameters_sharded():
    losses, params, _, _ = train_transformer(None)
    fsdp_losses, fsdp_params, (state, batch), step = train_transformer(dict(data=2, fsdp=4))
    np.testing.assert_allclose(fsdp_losses, losses, **TOLERANCE)
    compared = 0
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(fsdp_params), jax.tree.leaves(params)
    ):
        # The key bias adds the same q.b to every score of a row, which the softmax cancels: its
        # gradient is 0 up to rounding, and Adam scales that noise up to steps of the learning
        # rate, different for any other order of the sums.
        if "['key']['bias']" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
            )
            compared += 1
    assert compared == len(jax.tree.leaves(params)) - 2

    # After a step the parameters and Adam's moments are still split 4 ways over fsdp.
    embedding = state.params["embed"]["embedding"]
    assert embedding.shape == (64, 32)
    assert embedding.sharding.shard_shape(embedding.shape) == (16, 32)
    sharded = [
        x
        for x in jax.tree.leaves((state.params, state.opt_state))
        if any(size % 4 == 0 for size in x.shape)
    ]
    assert len(sharded) > 2 * len(jax.tree.leaves(state.params))  # parameters, mu and nu
    for x in sharded:
        assert np.prod(x.sharding.shard_shape(x.shape)) * 4 == x.size, x.shape
    # Gathered for compute, gradients reduce-scattered: both collectives are in the program.
    program = step.lower(state, batch).compile().as_text()
    assert "all-gather" in program and "reduce-scatter" in program


def test_a_state_made_on_a_mesh_is_the_host_state_laid_out_by_the_rules():
    from test_parallel import toy_setup

    model, task, opt, host_state, batches = toy_setup()
    mesh = parallel.make_mesh(dict(data=2, fsdp=4))
    state = loop.make_init(model, task, opt, mesh)(0, batches[0])
    jax.tree.map(np.testing.assert_array_equal, parallel.fetch(state), host_state)
    specs = loop.state_specs(host_state, mesh)
    assert specs.params["Embed_0"]["embedding"] == parallel.P("fsdp", None)  # [16, 16]
    jax.tree.map(
        lambda x, spec: np.testing.assert_equal(x.sharding.spec, spec),
        state,
        specs,
        is_leaf=lambda x: isinstance(x, parallel.P),
    )


def test_fsdp_spec_splits_the_largest_dimension_it_divides():
    assert parallel.fsdp_spec((64, 32), 4) == parallel.P("fsdp", None)
    assert parallel.fsdp_spec((6, 32), 4) == parallel.P(None, "fsdp")
    assert parallel.fsdp_spec((32, 32), 4) == parallel.P("fsdp", None)  # the first of equals
    assert parallel.fsdp_spec((6, 3), 4) == parallel.P()  # none divides: replicated
    assert parallel.fsdp_spec((), 4) == parallel.P()
    assert parallel.fsdp_spec((64, 32), 1) == parallel.P()


@pytest.mark.parametrize(
    "first, second", [(dict(data=8), dict(data=2, fsdp=4)), (dict(data=2, fsdp=4), dict(data=8))]
)
def test_a_checkpoint_written_on_one_mesh_resumes_on_another(
    monkeypatch, tmp_path, caplog, first, second
):
    use_toy_setup(monkeypatch)
    caplog.set_level("INFO")
    config = toy_config(num_train_steps=20, best_metric="")
    uninterrupted = loop.train_and_evaluate(config, str(tmp_path / "once")).state
    restore, restored_shards = Checkpointer.restore_latest, []

    def restore_and_record(self, like_state, data_iterator):
        state = restore(self, like_state, data_iterator)
        if state is not None:
            kernel = state.params["Dense_0"]["kernel"]  # [16, 16]
            restored_shards.append(kernel.sharding.shard_shape(kernel.shape))
        return state

    monkeypatch.setattr(Checkpointer, "restore_latest", restore_and_record)

    for sizes, steps in ((first, 10), (second, 20)):
        config = toy_config(num_train_steps=steps, best_metric="")
        config.mesh.update(dict(data=sizes["data"], fsdp=sizes.get("fsdp", 1)))
        result = loop.train_and_evaluate(config, str(tmp_path / "moved"))
        assert result.summary["mesh"]["fsdp"] == sizes.get("fsdp", 1)
    assert "resumed from the checkpoint at step 10 (digests verified)" in caplog.text
    assert restored_shards == [(16 // second.get("fsdp", 1), 16)]  # onto the second mesh
    assert int(result.state.step) == 20
    for a, b in (
        (result.state.params, uninterrupted.params),
        (result.state.opt_state, uninterrupted.opt_state),
    ):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOLERANCE), a, b)


@pytest.mark.parametrize(
    "mesh, message",
    [
        (
            dict(data=3),
            r"config.mesh \(data=3\) does not fit 8 devices: its sizes multiply to 3; "
            r"allowed: a product equal to 8",
        ),
        (
            dict(data=-1, fsdp=3),
            r"config.mesh \(data=-1 x fsdp=3\) does not fit 8 devices: its "
            r"sizes other than -1 multiply to 3; allowed: a product that divides 8",
        ),
        (
            dict(data=-1, fsdp=-1),
            r"config.mesh gives -1 \(the rest of the devices\) for data and fsdp; allowed: -1 for "
            r"one axis at most: give the others sizes, e.g. config.mesh.data=1",
        ),
        (dict(data=4, tensor=2), r"config.mesh.tensor=2: tensor parallelism .* allowed: 1"),
        (
            dict(data=-1, fsdp=0),
            r"config.mesh.fsdp=0 is invalid; allowed: a positive integer, "
            r"or -1",
        ),
    ],
)
def test_a_bad_mesh_is_refused_before_anything_is_written(monkeypatch, tmp_path, mesh, message):
    use_toy_setup(monkeypatch)
    config = toy_config()
    config.mesh.update(dict(dict(data=-1, fsdp=1, tensor=1, context=1), **mesh))
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_fsdp_under_pmap_and_a_batch_the_mesh_cannot_split_are_refused(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"config.parallel='pmap' runs data parallelism only, but config.mesh.fsdp=4; "
        r"allowed: fsdp=1 with pmap, or config.parallel='shard_map'",
    ):
        loop.prepare(toy_config(parallel="pmap", **{"mesh.data": 2, "mesh.fsdp": 4}))
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=12 does not divide across 8 batch shards \(data=2 x fsdp=4; "
        r"8 devices on 1 hosts\); use a multiple of 8",
    ):
        loop.train_and_evaluate(
            toy_config(global_batch_size=12, **{"mesh.data": 2, "mesh.fsdp": 4}),
            str(tmp_path / "run"),
        )
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"unknown config field 'mesh.fdsp'; allowed: \['context'"):
        config = toy_config()
        with config.mesh.unlocked():
            config.mesh.fdsp = 4
        loop.prepare(config)


# ---------------------------------------------------------------------------------------------
# Context parallelism: each sequence split over "context", attention as a ring.


def train_lm(pattern, sizes, devices=None, steps=2, packed=False):
    """(losses `[steps]`, host parameters) of a tiny decoder LM (no dropout: its masks would
    differ per device) trained on batches `[8, 32]` with padding, on a mesh of `sizes`; with
    `packed`, each row holds 3 documents (segment ids and per-document positions)."""
    from transformer.modules.models import build_model

    model = build_model(
        dict(
            name="decoder_lm",
            vocab_size=32,
            d_model=16,
            num_heads=2,
            d_ff=32,
            num_layers=1,
            max_len=32,
            positional="rotary",
            dropout_rate=0.0,
            **pattern,
        )
    )
    task = tasks.get_task("language_modelling")
    opt = optimizer.make_optimizer(
        ml_collections.ConfigDict(
            dict(
                learning_rate=1e-2,
                warmup_steps=0,
                schedule="constant",
                weight_decay=0.0,
                b1=0.9,
                b2=0.98,
                eps=1e-9,
                grad_clip_norm=0.0,
            )
        ),
        total_steps=steps,
    )
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 32, size=(steps, 8, 32)).astype(np.int32)
    inputs[:, :3, 27:] = 0  # padded tokens: keys no one attends to, targets of weight 0
    targets = np.concatenate([inputs[:, :, 1:], np.zeros((steps, 8, 1), np.int32)], axis=2)
    batches = [{"inputs": x, "targets": y} for x, y in zip(inputs, targets)]
    if packed:  # documents of 10, 13 and 9 tokens: boundaries inside the shards of 8
        segment_ids = np.broadcast_to(np.repeat([1, 2, 3], [10, 13, 9]), (8, 32))
        positions = np.broadcast_to(np.concatenate([np.arange(n) for n in (10, 13, 9)]), (8, 32))
        for batch in batches:
            batch.update(
                segment_ids=segment_ids.astype(np.int32), positions=positions.astype(np.int32)
            )
    mesh = parallel.make_mesh(sizes, devices)
    state = loop.make_init(model, task, opt, mesh)(0, batches[0])
    step = parallel.distribute(
        loop.make_train_step(model, task, opt, label_smoothing=0.0, mesh=mesh), "shard_map", mesh
    )
    losses = []
    for batch in batches:
        device_batch = parallel.global_batch(batch, mesh, "shard_map", loop.context_order(model))
        state, metrics = step(state, device_batch)
        sums = parallel.fetch(metrics)
        losses.append(sums["loss"][0] / sums["loss"][1])
    return np.array(losses), parallel.fetch(state.params)


LM_PATTERNS = {
    "causal": dict(pattern="causal"),
    # Multi-query heads, learned sinks and a soft cap: the sinks' gradient is summed over the
    # sequence shards as every other parameter's.
    "sliding_window": dict(
        pattern="sliding_window",
        pattern_options=dict(left=5),
        num_kv_heads=1,
        attention_sinks=True,
        logit_soft_cap=5.0,
    ),
}


@pytest.mark.parametrize(
    "pattern, sizes, packed",
    [
        ("causal", dict(data=2, context=4), True),
        ("sliding_window", dict(data=1, fsdp=2, context=4), False),
    ],
)
def test_context_meshes_train_the_one_device_losses_and_parameters(pattern, sizes, packed):
    one_losses, one_params = train_lm(
        LM_PATTERNS[pattern], dict(data=1), jax.devices()[:1], packed=packed
    )
    losses, params = train_lm(LM_PATTERNS[pattern], dict(sizes, data=-1), packed=packed)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    compared = 0
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(one_params)
    ):
        # The key bias's gradient is 0 up to rounding (the softmax cancels it), which Adam
        # scales up to steps of the learning rate, different for any other order of the sums.
        if "['key']['bias']" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(
                a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
            )
            compared += 1
    assert compared == len(jax.tree.leaves(params)) - 1


def use_tiny_transformers(monkeypatch):
    """The toy data, with `config.model` built as a tiny Transformer of the zoo."""
    from transformer.modules.models import build_model

    use_toy_setup(monkeypatch)
    tiny = dict(vocab_size=16, d_model=16, num_heads=2, d_ff=32, num_layers=1, max_len=8)
    monkeypatch.setattr(
        loop, "build_model", lambda model_config: build_model(dict(tiny, **model_config))
    )


def test_a_run_on_a_context_mesh_evaluates_and_resumes_on_another_mesh(
    monkeypatch, tmp_path, caplog
):
    use_tiny_transformers(monkeypatch)
    caplog.set_level("INFO")
    workdir = str(tmp_path / "run")
    for sizes, steps in ((dict(data=4, context=2), 10), (dict(data=8, context=1), 12)):
        config = toy_config("language_modelling", num_train_steps=steps, best_metric="")
        config.model = ml_collections.ConfigDict(dict(name="decoder_lm", pattern="causal"))
        config.mesh.update(sizes)
        result = loop.train_and_evaluate(config, workdir)
        assert result.summary["mesh"]["context"] == sizes["context"]
        assert result.summary["status"] == "completed"
        assert np.isfinite(result.summary["final"]["eval/loss"])
    assert "resumed from the checkpoint at step 10 (digests verified)" in caplog.text
    assert int(result.state.step) == 12


@pytest.mark.parametrize(
    "task, model, overrides, message",
    [
        (
            "language_modelling",
            "decoder_lm",
            {"parallel": "pmap", "mesh.context": 2},
            r"config.parallel='pmap' runs data parallelism only, but config.mesh.context=2; "
            r"allowed: context=1 with pmap, or config.parallel='shard_map'",
        ),
        (
            "language_modelling",
            "decoder_lm",
            {"mesh.data": 1, "mesh.context": 8},
            r"config.data \(train batches\): sequences of length 8 do not divide into 2 x 8 "
            r"zig-zag chunks \(config.mesh.context=8, zig-zag order for a causal model\); "
            r"allowed: a length that is a multiple of 16",
        ),
        (
            "classification",
            "encoder_classifier",
            {"mesh.data": 4, "mesh.context": 2},
            r"config.mesh.context=2 splits each sequence over 2 devices, which config.model "
            r"\(name 'encoder_classifier'\) cannot run: .*EncoderClassifier pools over the whole "
            r"sequence.* Allowed: config.mesh.context=1, or a model whose attention is all "
            r"self-attention",
        ),
    ],
)
def test_context_parallelism_a_run_cannot_use_is_refused_before_anything_is_written(
    monkeypatch, tmp_path, task, model, overrides, message
):
    use_tiny_transformers(monkeypatch)
    config = toy_config(task, **overrides)
    config.model = ml_collections.ConfigDict(dict(name=model))
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
