"""The experiment files: every preset and variant builds a model, and each smoke preset sweeps.

Building a config here goes as far as training would before reading data: the config checks,
the data config of every training and evaluation set (data_info, no data generated) and the
model itself (build_model, which also builds the attention pattern).
"""

import csv
import json
import math
import os

import pytest
from experiment_files import EXPERIMENTS, load_experiment

from transformer.data import data_info, with_overrides
from transformer.training import config_schema, experiment, loop, sweep


def every_preset_and_variant():
    for file_name in EXPERIMENTS:
        module = load_experiment(file_name)
        for preset in module.PRESETS:
            for variant in module.get_config(preset).sweep.variants:
                yield file_name, f"{preset},{variant}"


@pytest.mark.parametrize("file_name,arg", list(every_preset_and_variant()))
def test_every_preset_and_variant_builds_its_data_and_model(file_name, arg):
    config = load_experiment(file_name).get_config(arg)
    config_schema.validate(config)
    for overrides in [*config.train_mixture.values(), *config.eval_data.values()]:
        assert data_info(with_overrides(config.data, overrides)).task == config.task
    model_config = loop.with_data_fields(config)
    loop.build_model(model_config)
    if config.model.get("positional") == "learned":
        # Every evaluation sequence fits the learned table: a longer one would stop the sweep.
        longest = max(
            data_info(with_overrides(config.data, overrides)).max_length
            for overrides in config.eval_data.values() or [{}]
        )
        assert model_config.max_len >= longest
    plot = config.sweep.get("plot")
    if plot:
        assert {key for _, key in plot.points} <= set(config.sweep.metrics)


@pytest.mark.parametrize("file_name", EXPERIMENTS)
def test_an_unknown_preset_or_variant_names_the_allowed_ones(file_name):
    get_config = load_experiment(file_name).get_config
    with pytest.raises(ValueError, match=r"unknown preset 'gpu'; allowed: .*'smoke'"):
        get_config("gpu")
    with pytest.raises(ValueError, match=r"unknown \w+ variant 'no_such_thing'") as error:
        get_config("smoke,no_such_thing")
    # The message lists what is allowed (pattern_reach: the patterns its variant names start with).
    first_variant = get_config("smoke").sweep.variants[0]
    assert first_variant.split("-")[0] in str(error.value)


@pytest.mark.parametrize("file_name", EXPERIMENTS)
def test_presets_are_smoke_cpu_and_full_and_set_the_configs_own_fields(file_name):
    module = load_experiment(file_name)
    assert {"smoke", "cpu", "full"} <= set(module.PRESETS)  # and others, e.g. a CPU grid
    fields = set(module.PRESETS["cpu"])
    for preset, values in module.PRESETS.items():
        assert set(values) == fields, preset  # every preset sets the same fields
        config = json.loads(module.get_config(preset).to_json_best_effort())
        for dotted, value in json.loads(json.dumps(values)).items():
            # The preset's word is the command-line override's: --config.<dotted>=<value>.
            got = sweep.field(config, dotted)
            if isinstance(value, dict):  # a dict the experiment may add fields to
                got = {k: got[k] for k in value}
            assert got == value, (preset, dotted)


def test_a_preset_field_the_config_lacks_is_an_error_naming_it():
    config = config_schema.base_config()
    experiment.set_fields(config, {"num_train_steps": 7, "optimizer.learning_rate": 0.5})
    assert (config.num_train_steps, config.optimizer.learning_rate) == (7, 0.5)
    for misspelt in ("num_train_step", "optimiser.learning_rate", "seed.x"):
        with pytest.raises(ValueError, match=f"'{misspelt}'"):
            experiment.set_fields(config, {misspelt: 1})


def test_split_and_check_name_the_bad_value_and_the_allowed_ones():
    presets = {"smoke": {}, "cpu": {}}
    assert experiment.split("cpu", presets) == ("cpu", "")
    assert experiment.split("smoke,a-2", presets) == ("smoke", "a-2")
    with pytest.raises(ValueError, match=r"unknown preset 'gpu'; allowed: \['smoke', 'cpu'\]"):
        experiment.split("gpu,a", presets)
    with pytest.raises(ValueError, match=r"unknown x variant 'c'; allowed: \['a', 'b'\]"):
        experiment.check("x variant", "c", ("a", "b"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


# file -> the variant its smoke test trains (the one most likely to break: sparse patterns, the
# learned table evaluated past the training length).
SMOKE_VARIANTS = {
    "listops.py": "bigbird",
    "shakespeare.py": "window_anchors",
    "positional.py": "learned",
}


@pytest.mark.parametrize("file_name", sorted(SMOKE_VARIANTS))
def test_smoke_preset_sweeps_end_to_end_into_the_results_table(file_name, tmp_path, data_dir):
    experiment = load_experiment(file_name).get_config
    variant = SMOKE_VARIANTS[file_name]

    def get_config(arg):  # one variant, one seed: the whole path at the least cost
        config = experiment(arg)
        config.sweep.variants = (variant,)
        config.sweep.seeds = (0,)
        return config

    plan = get_config("smoke").sweep
    assert experiment("smoke").num_train_steps <= 20
    records = sweep.run_sweep(get_config, "smoke", str(tmp_path), {"data_dir": data_dir})

    assert os.path.exists(tmp_path / "runs" / variant / "seed_0" / "summary.json")
    (record,) = records
    for metric in plan.metrics:
        assert math.isfinite(record["results"][metric]), metric
    assert record["results"].get("train/tokens_per_second", 0) > 0
    table = (tmp_path / "results.md").read_text()
    assert "| variant | runs | " + " | ".join(plan.metrics) + " |" in table
    assert f"| {variant} | 1 | " in table
    with open(tmp_path / "runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row[plan.metrics[0]]) == pytest.approx(
        record["results"][plan.metrics[0]], rel=1e-5
    )
    if "plot" in plan:
        assert (tmp_path / "plot.png").stat().st_size > 1000
