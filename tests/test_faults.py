"""Faults lose nothing and are never silent: one writer per workdir, a log that survives damage,
a finished run left as it is, sweeps that share work."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_train import toy_config, use_toy_setup

from transformer.training import loop, sweep, workdir_lock
from transformer.training.metrics import DROPPED, read_metrics


def test_a_second_writer_is_refused_naming_the_holder(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    holder = workdir_lock.acquire(str(tmp_path))
    try:
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"process {os.getpid()} on "):
            loop.train_and_evaluate(toy_config(num_train_steps=10), str(tmp_path))
        assert not (tmp_path / "checkpoints").exists()
    finally:
        workdir_lock.release(holder)
    assert loop.train_and_evaluate(toy_config(num_train_steps=10), str(tmp_path)).summary["step"]


def test_a_lock_left_by_a_killed_process_does_not_block_a_restart(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    code = (
        "import sys, time; from transformer.training import workdir_lock;"
        f"held = workdir_lock.acquire({str(tmp_path)!r}); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"process {holder.pid} "):
        workdir_lock.acquire(str(tmp_path))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    summary = loop.train_and_evaluate(toy_config(num_train_steps=10), str(tmp_path)).summary
    assert summary["status"] == "completed"


def test_a_damaged_log_line_anywhere_does_not_block_a_restart(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    loop.train_and_evaluate(toy_config(num_train_steps=20), str(tmp_path))
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    # A line cut short (a full disk) in the middle, then more rows appended after it.
    assert json.loads(lines[0])["split"] == "train"
    lines[0] = lines[0][: len(lines[0]) // 2] + "\n"
    log.write_text("".join(lines))
    summary = loop.train_and_evaluate(toy_config(num_train_steps=30), str(tmp_path)).summary
    assert summary["step"] == 30
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["split"] == "eval"] == [10, 20, 30]
    assert lines[0] in (tmp_path / DROPPED).read_text()  # kept aside, not lost


def test_after_a_resume_the_log_holds_no_rows_past_the_restored_step(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    loop.train_and_evaluate(toy_config(num_train_steps=20), str(tmp_path))
    # As after a SIGKILL at step 25: rows logged past the last checkpoint (step 20).
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 25, "split": "train", "loss": 9.0}) + "\n")
    loop.train_and_evaluate(toy_config(num_train_steps=30), str(tmp_path))
    steps = [(r["split"], r["step"]) for r in read_metrics(tmp_path)]
    assert len(steps) == len(set(steps)), "a step logged twice"
    assert not any(r.get("loss") == 9.0 for r in read_metrics(tmp_path))
    assert '"step": 25' in (tmp_path / DROPPED).read_text()


def test_running_a_finished_workdir_again_leaves_it_as_it_was(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    first = loop.train_and_evaluate(toy_config(num_train_steps=10), str(tmp_path)).summary
    summary_bytes = (tmp_path / "summary.json").read_bytes()
    log_bytes = (tmp_path / "metrics.jsonl").read_bytes()
    again = loop.train_and_evaluate(toy_config(num_train_steps=10), str(tmp_path)).summary
    assert again == json.loads(summary_bytes) and again["final"] == first["final"]
    assert (tmp_path / "summary.json").read_bytes() == summary_bytes
    assert (tmp_path / "metrics.jsonl").read_bytes() == log_bytes


def test_two_sweeps_on_one_workdir_share_the_runs(monkeypatch, tmp_path):
    """A run another sweep holds is left to it and read back when done, not trained twice."""
    import ml_collections

    from transformer.training import config_schema

    def get_config(arg):
        config = config_schema.base_config()
        config.data = ml_collections.ConfigDict({"name": "toy"})
        config.sweep.variants = ("a", "b")
        config.sweep.seeds = (0,)
        config.sweep.metrics = ("eval/accuracy",)
        return config

    def summary_of(config):
        return {
            "status": "completed",
            "step": 1,
            "config": json.loads(config.to_json_best_effort()),
            "final": {"eval/accuracy": 1.0},
            "tokens_per_second": 1.0,
        }

    trained_here = []

    def train(config, run_dir):
        with workdir_lock.held(run_dir):
            trained_here.append(os.path.basename(os.path.dirname(run_dir)))
            (open(os.path.join(run_dir, "summary.json"), "w")).write(json.dumps(summary_of(config)))
        return loop.TrainResult(summary_of(config), None)

    monkeypatch.setattr(loop, "prepare", lambda config, workdir=None: None)
    monkeypatch.setattr(loop, "train_and_evaluate", train)
    monkeypatch.setattr(sweep, "_BUSY_POLL_SECONDS", 0.1)
    plan = sweep.plan_runs(get_config, "smoke", str(tmp_path))
    run_a = plan.runs[0]

    other = workdir_lock.acquire(run_a.run_dir)  # the other sweep is training run "a"

    def other_sweep_finishes():
        time.sleep(1.0)
        with open(os.path.join(run_a.run_dir, "summary.json"), "w") as f:
            f.write(json.dumps(summary_of(run_a.config)))
        workdir_lock.release(other)

    finisher = threading.Thread(target=other_sweep_finishes)
    finisher.start()
    records = sweep.run_planned(plan, str(tmp_path))
    finisher.join()
    assert trained_here == ["b"]
    assert [r["variant"] for r in records] == ["a", "b"]
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name or name.count(".") > 1]


# Runs the rest of its command line as a Python program whose files may not grow past 40 KB
# (ignoring SIGXFSZ, so a write fails with EFBIG as on a full disk), by exec, without forking a
# process that has JAX's threads.
_WITH_FILE_SIZE_LIMIT = (
    "import os, resource, signal, sys;"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000));"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)


def test_a_failed_write_is_one_message_and_the_workdir_resumes(tmp_path):
    """The checkpoint at step 20 cannot be written: one message, exit 74, no traceback; the same
    command then resumes from step 10 and completes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    arguments = [
        os.path.join(root, "launch.py"),
        "--config=experiments/pattern_reach.py:smoke",
        "--config.model.d_model=64",
        "--config.model.num_heads=4",
        "--config.checkpoint_every_steps=10",
        f"--config.data_dir={tmp_path / 'data'}",
        f"--workdir={tmp_path / 'run'}",
    ]
    first = subprocess.run(
        [sys.executable, *arguments, "--config.num_train_steps=10"], cwd=root, capture_output=True
    )
    assert first.returncode == 0  # the data and the checkpoint at step 10 are written
    failed = subprocess.run(
        [sys.executable, "-c", _WITH_FILE_SIZE_LIMIT, *arguments, "--config.num_train_steps=20"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert failed.returncode == 74, failed.stderr[-3000:]
    assert len(errors) == 1 and "File too large (" in errors[0], failed.stderr[-3000:]
    assert str(tmp_path / "run" / "checkpoints") in errors[0]
    assert "Traceback" not in failed.stderr
    resumed = subprocess.run(
        [sys.executable, *arguments, "--config.num_train_steps=20"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint at step 10" in resumed.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 20


def test_library_reports_of_failed_writes_are_read_as_os_errors():
    """TensorStore and ArrayRecord report a failed write in their own exceptions' text."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("launch_module", os.path.join(root, "launch.py"))
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Failed writing: "/w/checkpoints/10/d/ab": Failed to write 12 bytes '
        "to file 15: No space left on device [os_error_code='28']"
    )
    array_record = RuntimeError(
        'Failed to finalize writing of split "test": write() failed: File too large; writing '
        "/data/x/incomplete.1/x-test.array_record-00000-of-00001"
    )
    for error, code, path in [
        (tensorstore, 28, "/w/checkpoints/10/d/ab"),
        (array_record, 27, "/data/x/incomplete.1/x-test.array_record-00000-of-00001"),
    ]:
        try:
            raise RuntimeError("during the save") from error
        except RuntimeError as outer:
            found = launch._os_error(outer)
        assert (found.errno, found.filename) == (code, path)
    assert launch._os_error(ValueError("a bad value")) is None


def test_two_writers_of_one_results_file_never_collide(tmp_path):
    """Each write goes through its own temporary file: two sweeps rewriting results.md at once
    never remove each other's temporary file, and the file always holds one whole version."""
    path = str(tmp_path / "results.md")
    errors = []

    def write_many(text):
        try:
            for _ in range(150):
                sweep._replace(path, text)
        except OSError as error:  # a shared temporary name fails here
            errors.append(error)

    writers = [threading.Thread(target=write_many, args=(f"{name}\n" * 200,)) for name in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert not errors
    assert (tmp_path / "results.md").read_text() in ("a\n" * 200, "b\n" * 200)
    assert os.listdir(tmp_path) == ["results.md"]
