"""launch.py and sweeps, on the experiments' `smoke` presets with their real data and models."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from experiment_files import EXPERIMENTS, ROOT, load_experiment
from ml_collections import config_flags
from xla_flags import with_device_count

from transformer.training import config_schema, loop, sweep


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("file_name", EXPERIMENTS)
def test_every_experiment_has_valid_smoke_and_sweep_configs(file_name):
    get_config = load_experiment(file_name).get_config
    smoke = get_config("smoke")
    config_schema.validate(smoke)
    assert smoke.num_train_steps <= 50, "smoke must train a handful of steps"
    for variant in smoke.sweep.variants:
        config_schema.validate(get_config(f"smoke,{variant}"))


# The launches below share one trained workdir: each is a whole training run to compile.
SMOKE_RUN = pytest.mark.xdist_group("test_launch smoke run")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    """launch.py trains the smoke preset with overrides, on 2 devices, in the workdir of a run
    that failed before its first checkpoint (its config.json names a misspelt pattern). Returns
    the completed process, the workdir and the command's arguments."""
    workdir = tmp_path_factory.mktemp("smoke") / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {"pattern": "slidng_window"}}))
    arguments = [
        "--config=experiments/pattern_reach.py:smoke,sliding_window-2layers",
        f"--workdir={workdir}",
        "--config.num_train_steps=6",
        f"--config.data_dir={data_dir}",
    ]
    completed = _launch(*arguments, devices=2)
    return completed, workdir, arguments


@SMOKE_RUN
def test_launch_trains_the_smoke_preset_with_overrides(smoke_run):
    completed, workdir, _ = smoke_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["device_count"] == 2
    assert summary["config"]["model"]["pattern"] == "sliding_window"
    assert "eval_d4/accuracy=" in completed.stdout
    assert "step 6/6" in completed.stderr  # the plain log line when not on a terminal
    # Library chatter stays out of the log unless asked for with -v 1.
    for noise in ("Using custom data configuration", "Unable to initialize backend"):
        assert noise not in completed.stderr
    # The run records where it ran.
    machine = summary["machine"]
    assert machine["cpu_cores"] >= 1 and machine["cpu_model"]
    assert machine["versions"]["jax"] == jax.__version__


@SMOKE_RUN
def test_a_corrected_command_runs_in_the_workdir_of_a_failed_one(smoke_run):
    """A run that failed before its first checkpoint protects nothing: its workdir takes the
    corrected config."""
    completed, workdir, _ = smoke_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["pattern"] == "sliding_window"


@SMOKE_RUN
def test_a_changed_config_in_a_workdir_with_checkpoints_is_a_short_error(smoke_run, tmp_path):
    _, trained, arguments = smoke_run
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    saved = (workdir / "config.json").read_text()
    arguments = [f"--workdir={workdir}" if a.startswith("--workdir=") else a for a in arguments]
    completed = _launch(*arguments, "--config.seed=1", devices=2)
    lines = _error_lines(completed.stderr)
    assert completed.returncode == 2 and len(lines) <= 3, completed.stderr[-2000:]
    assert "holds checkpoints of a run with a different config (seed: 0 -> 1)" in lines[0]
    assert (workdir / "config.json").read_text() == saved


def _launch(*args, cwd=ROOT, devices=None):
    """launch.py with `args`; on `devices` CPU devices if given, else the suite's eight."""
    env = os.environ if devices is None else dict(os.environ, XLA_FLAGS=with_device_count(devices))
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _error_lines(stderr):
    """stderr without absl's own log lines (they start with I, W or E and a date)."""
    return [line for line in stderr.splitlines() if line and line[:5].strip("IWE0123456789")]


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--config.model.patern=full"],
            r"--config.model.patern: config.model has no field 'patern'. Did you mean \"pattern\"",
        ),
        (
            ["--config.model.pattern=slidng_window"],
            r"config.model: unknown attention pattern 'slidng_window'; allowed: .*'sliding_window'",
        ),
        (["--config.num_train_steps=-3"], r"config.num_train_steps=-3 is invalid; allowed: a posi"),
        (["--config.model.d_model=abc"], r"--config.model.d_model=abc: invalid literal for int"),
        (
            ["--config.best_metric=eval/acuracy"],
            r"config.best_metric='eval/acuracy' is not a result this run produces; allowed: .*"
            r"eval_d4/accuracy",
        ),
    ],
)
def test_a_config_mistake_is_a_short_error_and_writes_nothing(tmp_path, args, expected):
    workdir = tmp_path / "run"
    completed = _launch(
        "--config=experiments/pattern_reach.py:smoke", *args, f"--workdir={workdir}"
    )
    lines = _error_lines(completed.stderr)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert len(lines) <= 3 and "Traceback" not in completed.stderr, completed.stderr
    assert lines[0].startswith("error: ") and re.search(expected, lines[0]), lines
    assert not workdir.exists()


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            "experiments/nope.py:smoke",
            r"the file 'experiments/nope.py' does not exist.*pattern_reach",
        ),
        ("experiments/pattern_reach.py:smok", r"unknown preset 'smok'; allowed: .*'smoke'"),
        ("experiments/pattern_reach.py:smoke,foo", r"unknown pattern_reach variant 'foo'"),
    ],
)
def test_a_missing_file_preset_or_variant_is_a_short_error(tmp_path, config, expected):
    completed = _launch(f"--config={config}", f"--workdir={tmp_path / 'run'}")
    lines = _error_lines(completed.stderr)
    assert completed.returncode == 2 and len(lines) <= 3, completed.stderr[-2000:]
    assert re.search(expected, lines[0]), lines


def test_a_task_field_for_another_task_is_refused(tmp_path):
    config = load_experiment("pattern_reach.py").get_config("smoke")
    config.translation_eval = {"strategy": "greedy"}
    with pytest.raises(
        ValueError, match=r"config.translation_eval is read only by task\(s\) \['seq2seq'\]"
    ):
        loop.prepare(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("keep me")
    completed = _launch(
        "--config=experiments/pattern_reach.py:smoke", f"--workdir={not_a_directory}"
    )
    assert completed.returncode == 2
    assert f"the workdir {not_a_directory} is a file" in _error_lines(completed.stderr)[0]
    assert not_a_directory.read_text() == "keep me"


def test_a_busy_workdir_is_a_short_error_naming_the_holder(tmp_path):
    from transformer.training import workdir_lock

    holder = workdir_lock.acquire(str(tmp_path / "run"))
    try:
        completed = _launch(
            "--config=experiments/pattern_reach.py:smoke", f"--workdir={tmp_path / 'run'}"
        )
    finally:
        workdir_lock.release(holder)
    lines = _error_lines(completed.stderr)
    assert completed.returncode == 2 and len(lines) <= 3, completed.stderr[-2000:]
    assert f"is in use by process {os.getpid()} on " in lines[0]


def test_incomplete_multi_process_flags_are_a_short_error(tmp_path):
    completed = _launch(
        "--config=experiments/pattern_reach.py:smoke",
        f"--workdir={tmp_path / 'run'}",
        "--coordinator_address=localhost:1234",
    )
    lines = _error_lines(completed.stderr)
    assert completed.returncode == 2 and len(lines) <= 3, completed.stderr[-2000:]
    assert "--coordinator_address needs --num_processes and --process_id" in lines[0]


def test_a_sweep_checks_every_variant_before_training_any(tmp_path):
    workdir = tmp_path / "sweep"
    completed = _launch(
        "--config=experiments/pattern_reach.py:smoke",
        "--sweep",
        f"--workdir={workdir}",
        "--config.model.pattern_options={'left': 1}",
    )
    lines = _error_lines(completed.stderr)
    assert completed.returncode == 2 and len(lines) <= 3, completed.stderr[-2000:]
    assert lines[0].startswith("error: variant "), lines
    assert not (workdir / "runs").exists() or not any((workdir / "runs").rglob("checkpoints"))


def _parse_flags(argv):
    """Parses launch.py's --config flag from `argv` in a private flag registry."""
    argv = ["launch.py"] + argv
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=registry, lock_config=True, sys_argv=argv
    )
    registry(argv)
    return registry.config


def test_an_unknown_override_names_the_field():
    with pytest.raises(Exception, match=r"num_trian_steps.*(does not exist|not found|Did you)"):
        _parse_flags(["--config=experiments/pattern_reach.py:smoke", "--config.num_trian_steps=3"])


def test_an_invalid_override_names_the_field_and_the_allowed_values():
    config = _parse_flags(
        ["--config=experiments/pattern_reach.py:smoke", "--config.optimizer.schedule=linear"]
    )
    with pytest.raises(
        ValueError,
        match=r"config.optimizer.schedule='linear' is invalid; "
        r"allowed: one of \['constant', 'cosine', "
        r"'inverse_sqrt'\]",
    ):
        config_schema.validate(config)


def test_an_unknown_variant_names_the_allowed_ones():
    get_config = load_experiment("pattern_reach.py").get_config
    with pytest.raises(
        ValueError,
        match=r"unknown pattern_reach variant 'window-2layers'.*"
        r"'sliding_window'",
    ):
        get_config("smoke,window-2layers")
    with pytest.raises(ValueError, match=r"unknown preset 'gpu'; allowed: .*'cpu'") as raised:
        get_config("gpu")
    assert all(preset in str(raised.value) for preset in ("'smoke'", "'cpu'", "'full'"))


def test_sweep_writes_tables_and_plot_and_never_redoes_a_finished_run(
    tmp_path, data_dir, monkeypatch
):
    experiment = load_experiment("pattern_reach.py").get_config

    def get_config(arg):  # one variant, two seeds: enough to check the bookkeeping
        config = experiment(arg)
        config.sweep.variants = ("sliding_window-2layers",)
        config.sweep.seeds = (0, 1)
        return config

    plan = get_config("smoke").sweep
    metric = plan.metrics[0]
    overrides = {"data_dir": data_dir}
    records = sweep.run_sweep(get_config, "smoke", str(tmp_path), overrides)
    assert [(r["variant"], r["seed"]) for r in records] == [
        ("sliding_window-2layers", 0),
        ("sliding_window-2layers", 1),
    ]
    values = [r["results"][metric] for r in records]
    table = (tmp_path / "results.md").read_text()
    mean, std = sweep.aggregate(records, [metric])[0][metric]
    assert mean == pytest.approx(sum(values) / 2)
    assert f"| sliding_window-2layers | 2 | {mean:.3f} ± {std:.3f} |" in table
    with open(tmp_path / "runs.csv") as f:
        assert [float(r[metric]) for r in csv.DictReader(f)] == pytest.approx(values, rel=1e-5)
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert (tmp_path / "results.csv").exists()

    # A second sweep only reads the summaries; a lost results file is written again.
    os.remove(tmp_path / "results.md")
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *a: pytest.fail("retrained"))
    again = sweep.run_sweep(get_config, "smoke", str(tmp_path), overrides)
    assert [r["results"] for r in again] == [r["results"] for r in records]
    assert (tmp_path / "results.md").read_text() == table

    # The sweep plan is not part of a run: a plan with fewer seeds reuses the finished run.
    def fewer_seeds(arg):
        config = get_config(arg)
        config.sweep.seeds = (0,)
        return config

    assert len(sweep.run_sweep(fewer_seeds, "smoke", str(tmp_path), overrides)) == 1

    # A finished run of another config is never passed off as this one.
    def changed(arg):
        config = get_config(arg)
        config.optimizer.learning_rate = 0.5
        return config

    with pytest.raises(
        ValueError,
        match=r"used another config than the experiment now gives "
        r"\(optimizer.learning_rate: 0.003 -> 0.5\)",
    ):
        sweep.run_sweep(changed, "smoke", str(tmp_path), overrides)

    # A field added to the code since, empty by default, keeps the finished runs; set to
    # something, it is a change.
    def added_field(value):
        def get(arg):
            config = get_config(arg)
            with config.unlocked():
                config.new_evaluation = value
            return config

        return get

    assert len(sweep.run_sweep(added_field({}), "smoke", str(tmp_path), overrides)) == 2
    with pytest.raises(ValueError, match=r"\(new_evaluation: None -> \{'on': True\}\)"):
        sweep.run_sweep(added_field({"on": True}), "smoke", str(tmp_path), overrides)


def test_bfloat16_compute_keeps_float32_parameters_and_follows_the_float32_run(tmp_path, data_dir):
    get_config = load_experiment("pattern_reach.py").get_config
    finals = {}
    for dtype in ("float32", "bfloat16"):
        config = get_config("smoke,full-2layers")
        config.data_dir = data_dir
        config.model.dtype = dtype
        result = loop.train_and_evaluate(config, str(tmp_path / dtype))
        params = jax.tree.leaves(result.state.params)
        assert {leaf.dtype for leaf in params} == {np.dtype("float32")}
        finals[dtype] = result.summary["final"]["train/loss"]
    assert np.isfinite(finals["bfloat16"])
    assert finals["bfloat16"] == pytest.approx(finals["float32"], rel=0.05)
    assert finals["bfloat16"] != finals["float32"]  # the compute dtype did take effect

    # Running a finished workdir again leaves it as it was and returns its summary.
    again = loop.train_and_evaluate(config, str(tmp_path / "bfloat16"))
    assert again.summary == json.loads((tmp_path / "bfloat16" / "summary.json").read_text())
    assert again.summary["final"] == result.summary["final"]
    # Without its summary (lost after the last checkpoint), the run resumes at its end and
    # evaluates again: nothing is timed, and the summary says so rather than claim 0 tokens/s.
    os.remove(tmp_path / "bfloat16" / "summary.json")
    again = loop.train_and_evaluate(config, str(tmp_path / "bfloat16"))
    assert again.summary["tokens_per_second"] is None


def test_a_metric_missing_from_a_run_aggregates_as_nan_not_a_crash():
    records = [
        {"variant": "a", "seed": 0, "results": {"eval/accuracy": 0.5}},
        {
            "variant": "a",
            "seed": 1,
            "results": {"eval/accuracy": 0.7, "train/tokens_per_second": 10.0},
        },
    ]
    (row,) = sweep.aggregate(records, ["eval/accuracy", "train/tokens_per_second"])
    assert row["eval/accuracy"][0] == pytest.approx(0.6)
    assert np.isnan(row["train/tokens_per_second"][0])


def test_speed_plot_puts_each_variant_at_its_speed_and_metric(tmp_path):
    records = [
        {"variant": v, "seed": seed, "results": {"eval/accuracy": acc}, "tokens_per_second": tps}
        for v, seed, acc, tps in [("a", 0, 0.5, 100.0), ("a", 1, 0.7, 120.0), ("b", 0, 0.9, 50.0)]
    ]
    rows = sweep.aggregate(records, ["eval/accuracy"])
    assert rows[0][sweep.SPEED] == pytest.approx((110.0, 14.142136))
    sweep.speed_plot(rows, "eval/accuracy", str(tmp_path / "speed.png"))
    assert (tmp_path / "speed.png").read_bytes().startswith(b"\x89PNG")
