"""experiments/train_speed.py: the cpu preset is the target model, the smoke preset
sweeps end to end, and the report tabulates speed and memory from the sweep's runs."""

import csv
import math

import jax
import numpy as np
import optax
import pytest
from experiment_files import load_experiment

from transformer import patterns
from transformer.data import data_info
from transformer.modules.models import layer_pattern
from transformer.training import loop, parallel, sweep
from transformer.training.optimizer import make_optimizer

speed = load_experiment("train_speed.py")


@pytest.mark.parametrize("variant", speed.get_config("cpu").sweep.variants)
def test_cpu_preset_trains_the_target_model_at_the_variants_length(variant):
    config = speed.get_config(f"cpu,{variant}")
    model = config.model
    assert (model.name, model.num_layers, model.d_model, model.num_heads, model.d_ff) == (
        "encoder_classifier",
        4,
        256,
        4,
        1024,
    )
    assert (model.norm_position, model.dtype, model.implementation) == ("post", "float32", "auto")
    assert config.global_batch_size == 8
    pattern, length = variant.rsplit("-", 1)
    assert list(model.pattern) == list(speed.pattern_of(pattern, speed.BLOCK["cpu"])[0])
    assert data_info(config.data).max_length == int(length)  # [CLS] included, no padding
    # One vocabulary at every length, so the embedding costs the same everywhere.
    assert data_info(config.data).vocab_size == data_info(speed.get_config("cpu").data).vocab_size
    # The first step compiles; at least two more are timed.
    assert config.num_train_steps >= 3 and config.log_every_steps == 1


def test_cpu_preset_trains_every_pattern_at_1k_and_4k_full_to_8k_and_bigbird_to_16k():
    variants = set(speed.get_config("cpu").sweep.variants)
    longest = {
        "full": 8192,
        "sliding_window": 16384,
        "anchor": 4096,
        "random": 4096,
        "bigbird": 16384,
        "causal": 4096,
        "local_global": 8192,
    }
    assert variants == {
        f"{p}-{n}" for p in speed.PATTERNS for n in (1024, 4096, 8192, 16384) if n <= longest[p]
    }


def test_the_local_global_schedule_is_three_window_layers_then_one_full_layer():
    config = speed.get_config("cpu,local_global-1024")
    model = loop.build_model(loop.with_data_fields(config))
    window = patterns.sliding_window(speed.BLOCK["cpu"])
    assert [layer_pattern(model.config, i, causal=False) for i in range(4)] == [window] * 3 + [
        patterns.full()
    ]


def test_the_optimizer_is_adamw():
    config = speed.get_config("cpu,full-1024")
    params = {"kernel": np.ones((2, 2), np.float32)}
    state = make_optimizer(config.optimizer, config.num_train_steps).init(params)
    adam_states = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    assert len(adam_states) == 1
    assert config.optimizer.weight_decay > 0


def test_bigbird_is_the_union_of_the_other_sparse_patterns_in_every_layer():
    block = speed.BLOCK["cpu"]
    for layer in range(4):  # random blocks are drawn per layer, from the same seed in each part
        built = {}
        for p in ("sliding_window", "anchor", "random", "bigbird"):
            pattern, pattern_options = speed.pattern_of(p, block)
            built[p] = patterns.build(pattern, layer=layer, **pattern_options)
        union = built["sliding_window"] | built["anchor"] | built["random"]
        np.testing.assert_array_equal(built["bigbird"].mask(1024, 1024), union.mask(1024, 1024))


def test_an_unknown_length_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'bigbird': \[1024, 4096, 8192, 16384\]"):
        speed.get_config("cpu,full-1000")
    with pytest.raises(ValueError, match=r"'full': \[1024, 4096, 8192\]"):
        speed.get_config("cpu,full-16384")


def test_train_step_memory_holds_parameters_and_adam_moments_and_grows_with_length():
    config = speed.get_config("smoke,full-64")
    setup = loop.prepare(config)
    programs = loop.programs(config, setup.model, setup.task, parallel.make_mesh())
    state = programs.init(
        0, {"inputs": np.ones((8, 64), np.int32), "targets": np.zeros(8, np.int32)}
    )
    param_bytes = sum(p.nbytes for p in jax.tree.leaves(state.params))
    short = speed.train_step_memory_gb(config)
    assert short * 1e9 >= 3 * param_bytes  # parameters, Adam's mu and nu
    assert speed.train_step_memory_gb(speed.get_config("smoke,full-128")) > short


SWEPT = ("full-64", "bigbird-128")  # two of the smoke preset's four: compiling is the cost


# Its tests run in one worker process, so the sweep runs once.
SWEPT_GROUP = pytest.mark.xdist_group("test_train_speed swept")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep of the smoke preset's variants SWEPT (one seed) and its report."""
    workdir = tmp_path_factory.mktemp("sweep")
    data_dir = str(tmp_path_factory.mktemp("tfds"))

    def get_config(arg):
        config = speed.get_config(arg)
        config.sweep.variants = SWEPT
        return config

    records = sweep.run_sweep(get_config, "smoke", str(workdir), {"data_dir": data_dir})
    return workdir, records, speed.report(str(workdir))


@SWEPT_GROUP
def test_smoke_sweep_times_every_variant(swept):
    workdir, records, _ = swept
    assert [r["variant"] for r in records] == list(SWEPT)
    for record in records:
        assert record["results"]["train/tokens_per_second"] > 0
    assert "| bigbird-128 | 1 | " in (workdir / "results.md").read_text()


@SWEPT_GROUP
def test_report_tabulates_speed_over_timed_steps_and_memory(swept):
    workdir, records, table = swept
    assert set(table) == {("full", 64), ("bigbird", 128)}
    for (pattern, length), (mean, std, steps, seeds, memory, devices) in table.items():
        config = speed.get_config(f"smoke,{pattern}-{length}")
        assert steps == config.num_train_steps - 1  # every step but the compiling first
        assert seeds == 1 and mean > 0 and math.isfinite(std) and memory > 0
        assert devices == jax.device_count()
    with open(workdir / "speed.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["pattern"], r["length"]) for r in rows] == [("full", "64"), ("bigbird", "128")]
    assert float(rows[1]["tokens_per_second_mean"]) == pytest.approx(
        table["bigbird", 128][0], rel=1e-3
    )
    text = (workdir / "speed.md").read_text()
    assert "| pattern | 64 | 128 |" in text
    assert f"Data parallel over {jax.device_count()} device(s)." in text
    # A cell that was not run says so; a length without full attention has no ratio.
    assert "| bigbird | not run | " in text and "| full | " in text
    assert "no baseline" in text
    assert (workdir / "speed.png").stat().st_size > 1000


@SWEPT_GROUP
def test_report_reads_memory_from_the_summary_when_the_loop_recorded_it(swept, tmp_path):
    import json
    import shutil

    workdir, _, _ = swept
    shutil.copytree(workdir / "runs", tmp_path / "runs")
    path = tmp_path / "runs" / "full-64" / "seed_0" / "summary.json"
    summary = json.loads(path.read_text())
    summary["final"]["train/peak_memory_gb"] = 123.0
    path.write_text(json.dumps(summary))
    assert speed.summarize(speed.finished_runs(str(tmp_path)))["full", 64][4] == 123.0


@SWEPT_GROUP
def test_report_refuses_runs_on_different_device_counts(swept, tmp_path):
    import json
    import shutil

    workdir, _, _ = swept
    shutil.copytree(workdir / "runs", tmp_path / "runs")
    other = tmp_path / "runs" / "bigbird-128" / "seed_0" / "summary.json"
    summary = json.loads(other.read_text())
    summary["device_count"] = 1 if jax.device_count() > 1 else 2
    other.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="different device counts"):
        speed.summarize(speed.finished_runs(str(tmp_path)))
