"""Checkpoints: stopping and resuming is exact; bad or foreign checkpoints are handled clearly."""

import os
import shutil
import signal

import jax
import numpy as np
import pytest
from test_train import toy_config, use_toy_setup

from transformer.training import loop, tasks, trained
from transformer.training.checkpoints import IncompatibleCheckpointError


def assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, a.opt_state, b.opt_state)
    assert int(a.step) == int(b.step)


def sigterm_at_step(monkeypatch, step):
    """Sends this process a SIGTERM during training step `step` (as a preemption would)."""
    count_tokens, calls = tasks.num_tokens, []

    def counting(task, batch):  # the loop calls it once per training step
        calls.append(None)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return count_tokens(task, batch)

    monkeypatch.setattr(tasks, "num_tokens", counting)


def test_sigterm_then_restart_ends_with_the_uninterrupted_parameters(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    # Dropout is on in the toy model: the RNG must resume exactly too.
    config = toy_config()
    uninterrupted = loop.train_and_evaluate(config, str(tmp_path / "once"))

    with monkeypatch.context() as patch:
        sigterm_at_step(patch, 13)
        stopped = loop.train_and_evaluate(config, str(tmp_path / "twice"))
    assert stopped.summary["status"] == "stopped" and stopped.summary["step"] == 13
    assert not (tmp_path / "twice" / "summary.json").exists()
    resumed = loop.train_and_evaluate(config, str(tmp_path / "twice"))
    assert resumed.summary["status"] == "completed"
    assert_same_params(resumed.state, uninterrupted.state)


def test_unreadable_latest_checkpoint_is_set_aside_and_the_previous_one_used(
    monkeypatch, tmp_path, caplog
):
    use_toy_setup(monkeypatch)
    config = toy_config(best_metric="")
    reference = loop.train_and_evaluate(config, str(tmp_path / "reference"))

    config.num_train_steps = 20
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["10", "20"]
    for path in (checkpoints / "20" / "state").rglob("*"):  # truncate every file of step 20
        if path.is_file():
            path.write_bytes(b"")
    config.num_train_steps = 30
    resumed = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert "checkpoint at step 20 cannot be read" in caplog.text
    assert os.listdir(tmp_path / "run" / "checkpoints_unreadable") == ["20"]
    # Resumed from step 10, it redoes steps 11-30 exactly.
    assert_same_params(resumed.state, reference.state)


def test_only_unreadable_checkpoints_is_an_error_not_a_fresh_start(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    config = toy_config(num_train_steps=10, best_metric="")
    loop.train_and_evaluate(config, str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "10" / "state")
    with pytest.raises(IncompatibleCheckpointError, match="no checkpoint in this workdir can be"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["10"]  # nothing overwritten or removed


def test_a_changed_model_config_is_refused_naming_the_field(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    loop.train_and_evaluate(toy_config(num_train_steps=10), str(tmp_path))
    changed = toy_config(num_train_steps=20, **{"optimizer.learning_rate": 0.5})
    with pytest.raises(
        IncompatibleCheckpointError,
        match=r"different config \(optimizer.learning_rate: 0.03 -> 0.5\)",
    ):
        loop.train_and_evaluate(changed, str(tmp_path))
    # Fields that do not change what a checkpoint means may change on a restart.
    longer = toy_config(num_train_steps=20, log_every_steps=5)
    assert loop.train_and_evaluate(longer, str(tmp_path)).summary["step"] == 20


def test_a_trained_run_loads_its_final_parameters_for_analysis(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    config = toy_config(num_train_steps=20, best_metric="")
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    run = trained.load(config, str(tmp_path / "run"))
    assert run.step == 20
    jax.tree.map(np.testing.assert_array_equal, run.params, result.state.params)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # read only

    other = toy_config(num_train_steps=20, **{"optimizer.learning_rate": 0.5})
    with pytest.raises(IncompatibleCheckpointError, match="optimizer.learning_rate"):
        trained.load(other, str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/ folder"):
        trained.load(config, str(tmp_path / "nowhere"))


def _change_a_stored_array(state_dir, state):
    """Rewrites the checkpoint's "state" item with one parameter changed, leaving its digests as
    saved: the files are well-formed and read without error, as after a bit flip in a value."""
    import orbax.checkpoint as ocp

    host = jax.tree.map(np.asarray, state)
    changed = host.replace(
        params={**host.params, "Dense_0": {**host.params["Dense_0"]}},
    )
    changed.params["Dense_0"]["bias"] = changed.params["Dense_0"]["bias"] + 1.0
    shutil.rmtree(state_dir)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(state_dir, changed)
    checkpointer.wait_until_finished()
    return "['Dense_0']['bias']"


def test_a_damaged_checkpoint_fails_its_digests_is_set_aside_and_the_previous_one_used(
    monkeypatch, tmp_path, caplog
):
    use_toy_setup(monkeypatch)
    config = toy_config(best_metric="")
    reference = loop.train_and_evaluate(config, str(tmp_path / "reference"))

    config.num_train_steps = 20
    at_20 = loop.train_and_evaluate(config, str(tmp_path / "run")).state
    damaged = _change_a_stored_array(tmp_path / "run" / "checkpoints" / "20" / "state", at_20)
    config.num_train_steps = 30
    resumed = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert f"array .params{damaged} does not match the digest" in caplog.text
    assert os.listdir(tmp_path / "run" / "checkpoints_unreadable") == ["20"]
    assert_same_params(resumed.state, reference.state)  # redone from step 10, exactly


def test_a_nan_right_after_a_restore_names_the_checkpoint(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    loop.train_and_evaluate(toy_config(num_train_steps=10), str(tmp_path))
    # Every batch after the restore makes the loss NaN, as a damaged state would.
    make_iterator = loop.make_iterator

    def poisoned(data_config, split, **kwargs):
        data_config = data_config.copy_and_resolve_references()
        data_config.nan_from_batch = 1  # batch indices continue from the restored position
        return make_iterator(data_config, split, **kwargs)

    monkeypatch.setattr(loop, "make_iterator", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match=r"after resuming from the checkpoint at"):
        loop.train_and_evaluate(toy_config(num_train_steps=20), str(tmp_path))
