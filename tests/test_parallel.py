"""Data parallelism: shard_map and pmap match one device; two processes over gloo, on a mesh with
FSDP across them or with context parallelism inside each, train what one process trains.

Run as a script, this file is one worker of the two-process tests:
  python tests/test_parallel.py <coordinator port> <process id> <workdir> <output.npz> <kind>
"""

import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from xla_flags import with_device_count

from transformer.training import loop, optimizer, parallel, tasks

LOSS_TOLERANCE = dict(rtol=2e-5, atol=2e-6)  # float32: sums in a different order


def toy_setup(seed=0):
    """A toy classifier without dropout, its optimizer, a state and 3 global batches of 16."""
    from test_train import ToyModel, toy_examples

    model = ToyModel(dropout_rate=0.0)
    task = tasks.get_task("classification")
    opt = optimizer.make_optimizer(
        ml_collections.ConfigDict(
            dict(
                learning_rate=0.05,
                warmup_steps=0,
                schedule="constant",
                weight_decay=0.01,
                b1=0.9,
                b2=0.98,
                eps=1e-9,
                grad_clip_norm=1.0,
            )
        ),
        total_steps=3,
    )
    batches = []
    for step in range(3):
        examples = [toy_examples("classification", 16 * step + i) for i in range(16)]
        batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        batch["targets"][:3] = 0  # uneven classes, so uneven per-device losses
        batches.append(batch)
    init = loop.make_init(model, task, opt)
    return model, task, opt, init(seed, batches[0]), batches


def run_steps(mode, devices, sizes=None):
    """Losses `[3]` and final parameters of 3 steps on a mesh of `devices` with axis `sizes`."""
    model, task, opt, state, batches = toy_setup()
    mesh = parallel.make_mesh(sizes, devices)
    step = parallel.distribute(
        loop.make_train_step(model, task, opt, label_smoothing=0.1, mesh=mesh, mode=mode),
        mode,
        mesh,
    )
    state = parallel.place(state, loop.state_specs(state, mesh), mesh, mode)
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, mesh, mode))
        sums = parallel.fetch(metrics)
        losses.append(sums["loss"][0] / sums["loss"][1])
    return np.array(losses), parallel.fetch(state.params)


@pytest.fixture(scope="module")
def one_device():
    return run_steps("shard_map", jax.devices()[:1])


@pytest.mark.xdist_group("test_parallel one_device")  # one worker: the reference runs once
@pytest.mark.parametrize("mode", parallel.MODES)
def test_eight_devices_match_one_device(mode, one_device):
    assert jax.device_count() == 8
    one_losses, one_params = one_device
    losses, params = run_steps(mode, jax.devices())
    np.testing.assert_allclose(losses, one_losses, **LOSS_TOLERANCE)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, one_params
    )
    assert losses[-1] < losses[0]


def test_gradient_is_the_global_batch_mean_whatever_the_padding_per_device():
    """Rows of weight 0 on some devices only: the step equals one on the real rows alone."""
    model, task, opt, state, batches = toy_setup()
    padded = dict(batches[0], weights=np.ones(16, np.float32))
    padded["weights"][:6] = 0  # devices 0-2 hold only padding
    real = {k: v[6:] for k, v in padded.items()}  # 10 rows: does not split over 8 devices
    new_params = []
    for batch, mesh in (
        (padded, parallel.make_mesh()),
        (real, parallel.make_mesh(devices=jax.devices()[:1])),
    ):
        step = loop.make_train_step(model, task, opt, label_smoothing=0.0, mesh=mesh)
        new_state, _ = parallel.distribute(step, "shard_map", mesh)(
            parallel.replicate(state, mesh, "shard_map"),
            parallel.global_batch(batch, mesh, "shard_map"),
        )
        new_params.append(parallel.fetch(new_state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *new_params)


def test_batch_not_dividing_across_devices_names_the_sizes():
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=20 does not divide across 8 batch shards "
        r"\(data=8 x fsdp=1; 8 devices on 1 hosts\); use a multiple of 8",
    ):
        parallel.local_batch_size(20)


def test_unknown_parallel_mode_is_named():
    with pytest.raises(ValueError, match=r"unknown parallel mode 'dp'; allowed: shard_map, pmap"):
        parallel.distribute(lambda s, b: (s, b), "dp", parallel.make_mesh())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Two processes of 2 devices each, each kind a few meshes in turn, resuming from the previous
# mesh's checkpoint:
# - "fsdp": the toy classifier, 3 steps with fsdp within each process, then 3 more with fsdp=4
#   spanning both: parameters are gathered and gradients reduce-scattered across processes, and
#   the checkpoint moves between meshes;
# - "context": a tiny causal decoder LM, data=2 splitting the rows between the processes and
#   context=2 each row's sequence between a process's own two devices (the ring stays within a
#   host, as `parallel` requires), for 4 steps.
TWO_PROCESS_MESHES = {
    "fsdp": ((dict(data=2, fsdp=2), 3), (dict(data=1, fsdp=4), 6)),
    "context": ((dict(data=2, context=2), 4),),
}


def two_process_config(kind):
    from test_train import toy_config

    if kind == "fsdp":
        config = toy_config(
            num_train_steps=6, eval_every_steps=3, log_every_steps=3, checkpoint_every_steps=3
        )
    else:
        config = toy_config(
            "language_modelling",
            num_train_steps=4,
            eval_every_steps=4,
            log_every_steps=4,
            checkpoint_every_steps=4,
            best_metric="",
        )
        config.model = ml_collections.ConfigDict(
            dict(name="decoder_lm", pattern="causal", dropout_rate=0.0)
        )
    config.mesh.update(dict(data=-1, fsdp=1))
    return config


def use_toy_setup_without_dropout(kind, monkeypatch):
    """The toy data and the kind's model without dropout (the LM's config turns it off):
    dropout masks follow a row's device, and rows lie on other devices when two processes read
    the batch."""
    from test_mesh import use_tiny_transformers
    from test_train import ToyModel, use_toy_setup

    if kind == "fsdp":
        use_toy_setup(monkeypatch)
        monkeypatch.setattr(loop, "build_model", lambda config: ToyModel(dropout_rate=0.0))
    else:
        use_tiny_transformers(monkeypatch)


def train_in_two_processes(kind, tmp_path, monkeypatch):
    """(parameters of process 0 and of process 1, their logs, the run's summary, and the
    parameters of the same run in this process on 8 data-parallel devices, trained meanwhile)."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=with_device_count(2), JAX_PLATFORMS="cpu")
    outputs = [tmp_path / f"params_{i}.npz" for i in range(2)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(port),
                str(i),
                str(tmp_path / "run"),
                str(outputs[i]),
                kind,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    use_toy_setup_without_dropout(kind, monkeypatch)  # meanwhile, one process on 8 devices
    one_process = loop.train_and_evaluate(two_process_config(kind), str(tmp_path / "one")).state
    logs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]
    params = [dict(np.load(path)) for path in outputs]
    reference = {
        jax.tree_util.keystr(path): value
        for path, value in jax.tree_util.tree_leaves_with_path(one_process.params)
    }
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return params, logs, summary, reference


def assert_params_match(params, reference, rtol, skip=()):
    """Both processes hold the same parameters, those of one process (names in `skip` apart)."""
    assert params[0].keys() == params[1].keys() == reference.keys() and len(reference) > 0
    for name in params[0]:
        np.testing.assert_array_equal(params[0][name], params[1][name])
    compared = 0
    for name, value in reference.items():
        if not any(part in name for part in skip):
            np.testing.assert_allclose(params[0][name], value, rtol=rtol, atol=1e-6, err_msg=name)
            compared += 1
    assert compared == len(reference) - len(skip)


def test_two_processes_over_gloo_train_a_data_x_fsdp_mesh_to_the_parameters_of_one(
    tmp_path, monkeypatch
):
    params, logs, summary, reference = train_in_two_processes("fsdp", tmp_path, monkeypatch)
    # Both processes together read the rows one process reads (in another order).
    assert_params_match(params, reference, rtol=1e-5)
    assert summary["device_count"] == 4 and summary["process_count"] == 2
    assert summary["mesh"] == dict(data=1, fsdp=4, tensor=1, context=1)
    assert "process 1 of 2; 2 local devices of 4" in logs[1]
    assert "resumed from the checkpoint at step 3 (digests verified)" in logs[0]


def test_two_processes_over_gloo_train_a_data_x_context_mesh_to_the_parameters_of_one(
    tmp_path, monkeypatch
):
    params, logs, summary, reference = train_in_two_processes("context", tmp_path, monkeypatch)
    # The key bias's gradient is 0 up to rounding (the softmax cancels it), which Adam scales
    # up to steps of the learning rate, different for any other order of the sums.
    assert_params_match(params, reference, rtol=1e-4, skip=["['key']['bias']"])
    assert summary["device_count"] == 4 and summary["process_count"] == 2
    assert summary["mesh"] == dict(data=2, fsdp=1, tensor=1, context=2)
    assert summary["status"] == "completed" and np.isfinite(summary["final"]["eval/loss"])
    assert "process 1 of 2; 2 local devices of 4" in logs[1]


def _worker(port, process_id, workdir, output, kind):
    """One of two processes: trains the kind's model for a few steps on each of its
    `TWO_PROCESS_MESHES`."""
    from absl import flags, logging

    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO)
    parallel.enable_cpu_collectives()
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import pytest as _pytest

    use_toy_setup_without_dropout(kind, _pytest.MonkeyPatch())
    config = two_process_config(kind)
    for mesh, steps in TWO_PROCESS_MESHES[kind]:
        config.mesh.update(mesh)
        config.num_train_steps = steps
        result = loop.train_and_evaluate(config, workdir)
    flat = {
        jax.tree_util.keystr(path): value
        for path, value in jax.tree_util.tree_leaves_with_path(result.state.params)
    }
    np.savez(output, **flat)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
