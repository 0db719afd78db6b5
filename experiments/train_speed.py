r"""Training speed and memory: tokens/s and peak memory of a training step against length.

One 4-layer post-LN encoder classifier (d_model 256, 4 heads, FFN 1024, batch 8, AdamW,
float32) trains a few steps at each sequence length with each attention pattern; full attention
is the baseline. What is measured is the training step, not what the model learns: the data
(associative recall, transformer/data/associative_recall.py) only supplies sequences of exactly
the length asked for, 2 * num_pairs + 1 tokens plus [CLS].

    JAX_NUM_CPU_DEVICES=2 python launch.py --config=experiments/train_speed.py:cpu --sweep \
        --workdir=/tmp/speed
    python experiments/train_speed.py /tmp/speed      # speed.md, speed.csv, speed.png
    python launch.py --config=experiments/train_speed.py:cpu,bigbird-4096 --workdir=/tmp/one

On a CPU, JAX_NUM_CPU_DEVICES=2 makes each core an XLA device and the loop data-parallel over
them (batch 8 = 2 x 4): one device for both cores leaves part of them idle. The report names the
device count.

Presets: "smoke" (tests), "cpu" (1,024 to 16,384 tokens on 2 cores: every pattern at 1,024
and 4,096, full attention and the local/global schedule to 8,192, BigBird and the window to
16,384), "full" (GPU/TPU, 1,024 to 65,536 tokens). Variants: "<pattern>-<length>", e.g. "bigbird-4096", the preset's
`sweep.variants`. The attention implementation is "auto" (transformer/attention/auto.py picks
one per pattern and length); `--config.model.implementation=<name>` measures another.

Speed: the loop leaves the first step (compilation) out of tokens/s and, with log_every_steps 1,
logs every later step on its own, so the report gives mean ± sample standard deviation over the
timed steps. Memory: XLA's buffer assignment of the compiled train step (arguments + outputs -
donated buffers + temporaries): what the step needs at its peak, exactly, whatever else runs on the
machine; the Python process, the input pipeline and compilation itself are not in it.

The loop always evaluates at its end; here that is one batch of the preset's shortest length, so
that it costs little. Its accuracy after a few steps means nothing and is not reported.
"""

import json
import math
import os

import ml_collections

from transformer.training import experiment
from transformer.training.config_schema import base_config

PATTERNS = ("full", "sliding_window", "anchor", "random", "bigbird", "causal", "local_global")


def pattern_of(pattern, block):
    """(pattern, pattern_options) for the model config. The sparse patterns are BigBird's parts
    (Zaheer et al., 2020: 3 window, 2 global and 3 random blocks) measured alone and in their
    union, so the same keys per query at every length. "local_global" is a per-layer schedule
    in the manner of Gemma 3 (five local layers to one global): three window layers, then one
    full layer, in this 4-layer model."""
    window = {"name": "sliding_window", "left": block}
    return {
        "local_global": ([window] * 3 + ["full"], {}),
        "full": ("full", {}),
        "causal": ("causal", {}),
        "sliding_window": ("sliding_window", {"left": block}),
        "anchor": ("anchor", {"num_anchors": 2 * block}),
        "random": ("random", {"num_blocks": 3, "block_size": block}),
        "bigbird": (
            "bigbird",
            {
                "block_size": block,
                "window_blocks": 3,
                "num_anchor_blocks": 2,
                "num_random_blocks": 3,
            },
        ),
    }[pattern]


def variant_name(pattern, length):
    return f"{pattern}-{length}"


def split_variant(name):
    """(pattern, length) of "<pattern>-<length>"; length None when it is not a number."""
    pattern, _, length = name.rpartition("-")
    return pattern, int(length) if length.isdigit() else None


def variants(patterns, lengths, longest=None):
    """ "<pattern>-<length>" for each pattern and each length up to longest[pattern] (default:
    all lengths)."""
    longest = longest or {}
    return tuple(
        variant_name(p, n) for p in patterns for n in lengths if n <= longest.get(p, max(lengths))
    )


# The target model: 4 layers, d_model 256, 4 heads, FFN 1024, batch 8, post-LN.
TARGET_MODEL = {
    "model.num_layers": 4,
    "model.d_model": 256,
    "model.num_heads": 4,
    "model.d_ff": 1024,
    "global_batch_size": 8,
}

PRESETS = {
    "smoke": {
        "model.num_layers": 2,
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.d_ff": 32,
        "global_batch_size": 8,
        "sweep.seeds": (0,),
        "sweep.variants": variants(("full", "bigbird"), (64, 128)),
    },
    # Every pattern runs at 1,024 and 4,096 tokens; full attention also at 8,192, and BigBird
    # and the sliding window (its cheapest part) up to 16,384, which shows that training there
    # fits in memory. The full preset has every length for every pattern.
    "cpu": {
        **TARGET_MODEL,
        "sweep.seeds": (0,),
        "sweep.variants": variants(
            PATTERNS,
            (1024, 4096, 8192, 16384),
            longest={
                "full": 8192,
                "causal": 4096,
                "anchor": 4096,
                "random": 4096,
                "local_global": 8192,
            },
        ),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        **TARGET_MODEL,
        "sweep.seeds": (0,),
        "sweep.variants": variants(PATTERNS, (1024, 2048, 4096, 8192, 16384, 32768, 65536)),
    },
}
# Not config fields: the sparse patterns' block (tokens), and how many steps a run times: enough
# for timed_tokens tokens, at least min_timed_steps. In the cpu preset: 1 + max(2, 65,536 /
# (8 x length)) steps, 8 timed steps at 1,024 tokens and 2 from 4,096 up.
BLOCK = {"smoke": 16, "cpu": 64, "full": 64}
TIMING = {
    "smoke": dict(timed_tokens=2048, min_timed_steps=2),
    "cpu": dict(timed_tokens=65_536, min_timed_steps=2),
    "full": dict(timed_tokens=1_048_576, min_timed_steps=5),
}


def recall_data(length, longest):
    """Associative recall of exactly `length` tokens ([CLS] + 2 * num_pairs + 1), with the key
    vocabulary of the preset's `longest` length at every length: one embedding size for all."""
    if length % 2 or length < 4:
        raise ValueError(f"train_speed lengths must be even and >= 4, got {length}.")
    return dict(num_pairs=length // 2 - 1, distance=2, num_keys=longest // 2 - 1, num_values=16)


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset, variant = experiment.split(arg, PRESETS)

    config = base_config()
    config.task = "classification"
    config.model = ml_collections.ConfigDict(
        dict(
            name="encoder_classifier",
            d_model=None,
            num_heads=None,
            d_ff=None,
            num_layers=None,
            # Mean pooling adds no token (a [CLS] vector would make the length 1 + a power of two)
            # and treats every pattern alike (a causal [CLS] would see only itself).
            # No dropout: its random masks would be timed too, and the target model has none.
            pooling="mean",
            positional="sinusoidal",
            norm_position="post",
            dropout_rate=0.0,
            pattern=None,
            pattern_options=None,
            implementation="auto",
            dtype="float32",
        )
    )
    experiment.set_fields(config, PRESETS[preset])  # None above: set by every preset

    variant = variant or config.sweep.variants[0]
    if variant not in config.sweep.variants:
        allowed = {}
        for p, n in map(split_variant, config.sweep.variants):
            allowed.setdefault(p, []).append(n)
        raise experiment.unknown(
            "train_speed variant",
            variant,
            f"'<pattern>-<length>' with these patterns and their lengths: {allowed}, e.g. "
            f"{config.sweep.variants[0]!r}",
        )
    pattern, length = split_variant(variant)
    config.model.pattern, config.model.pattern_options = pattern_of(pattern, BLOCK[preset])
    batch = config.global_batch_size
    timing = TIMING[preset]
    timed_steps = max(
        timing["min_timed_steps"], math.ceil(timing["timed_tokens"] / (batch * length))
    )
    steps = 1 + timed_steps  # the first step compiles and is not timed

    lengths = [n for _, n in map(split_variant, config.sweep.variants)]
    longest, shortest = max(lengths), min(lengths)
    config.data = ml_collections.ConfigDict(
        dict(
            name="associative_recall",
            config="pairs64",
            add_cls=True,
            builder_overrides=dict(
                **recall_data(length, longest),
                num_train=batch * steps,
                num_validation=batch,
                num_test=batch,
            ),
        )
    )
    # One evaluation set for every variant (num_train fixed: it names the prepared files).
    config.eval_data = {
        f"len{shortest}": {
            "builder_overrides": dict(**recall_data(shortest, longest), num_train=batch)
        }
    }
    config.eval_steps = 1
    config.num_train_steps = steps
    config.log_every_steps = 1  # every timed step is its own interval: a spread over steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.keep_checkpoints = 1
    config.optimizer.schedule = "constant"
    config.optimizer.warmup_steps = 0
    config.sweep.metrics = ("train/tokens_per_second",)
    return config


# ---------------------------------------------------------------------------------------------
# The report of a finished sweep: speed.md, speed.csv and speed.png beside the sweep's results.


def train_step_memory_gb(config):
    """Peak memory (GB, 1e9 bytes) of the training step `config` compiles to, from XLA's memory
    analysis: the step the training loop runs (loop.programs), compiled but not run. For runs
    whose summary.json predates the loop recording it."""
    import numpy as np

    from transformer.data import data_info
    from transformer.training import loop, parallel

    config = config.copy_and_resolve_references()
    config.parallel = "shard_map"  # a jitted step to lower; pmap's step computes the same
    mesh = parallel.make_mesh()
    setup = loop.prepare(config)
    programs = loop.programs(config, setup.model, setup.task, mesh)
    rows, length = config.global_batch_size, data_info(config.data).max_length
    batch = {"inputs": np.ones((rows, length), np.int32), "targets": np.zeros(rows, np.int32)}
    state = parallel.replicate(programs.init(config.seed, batch), mesh, config.parallel)
    return loop.train_step_memory_gb(
        programs.train_step, state, parallel.global_batch(batch, mesh, config.parallel)
    )


def finished_runs(workdir):
    """[{pattern, length, seed, speeds (tokens/s of each timed step), devices, memory_gb}] of the
    sweep's finished runs. Memory, of one device, comes from summary.json's
    "train/peak_memory_gb" when the loop recorded it, else from compiling the run's config
    again (on this process's devices)."""
    import jax

    from transformer.data import data_info
    from transformer.training.metrics import read_metrics

    runs = []
    root = os.path.join(workdir, "runs")
    for variant in sorted(os.listdir(root)):
        for seed_dir in sorted(os.listdir(os.path.join(root, variant))):
            run_dir = os.path.join(root, variant, seed_dir)
            path = os.path.join(run_dir, "summary.json")
            if not os.path.exists(path):
                continue
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
            config = ml_collections.ConfigDict(summary["config"])
            memory = summary["final"].get("train/peak_memory_gb")
            if memory is None and summary["device_count"] != jax.device_count():
                raise ValueError(
                    f"{path} has no peak memory and ran on "
                    f"{summary['device_count']} device(s); report it with as many "
                    f"(JAX_NUM_CPU_DEVICES={summary['device_count']}), not "
                    f"{jax.device_count()}, so that it compiles the same step."
                )
            runs.append(
                {
                    "pattern": split_variant(variant)[0],
                    "seed": config.seed,
                    "length": data_info(config.data).max_length,
                    "speeds": [r["tokens_per_second"] for r in read_metrics(run_dir, "train")],
                    "devices": summary["device_count"],
                    "memory_gb": train_step_memory_gb(config) if memory is None else memory,
                }
            )
    return runs


def summarize(runs):
    """{(pattern, length): (mean tokens/s, sample std, timed steps, seeds, peak GB per device,
    devices)}, pooling the timed steps of every seed."""
    import numpy as np

    devices = sorted({r["devices"] for r in runs})
    if len(devices) > 1:
        raise ValueError(
            f"the runs used different device counts {devices}; report sweeps with "
            "one device count, so that the table's ratios compare like with like."
        )
    table = {}
    order = lambda key: (PATTERNS.index(key[0]), key[1])  # full first, lengths ascending
    for key in sorted({(r["pattern"], r["length"]) for r in runs}, key=order):
        same = [r for r in runs if (r["pattern"], r["length"]) == key]
        speeds = np.array([s for r in same for s in r["speeds"]], np.float64)
        std = speeds.std(ddof=1) if len(speeds) > 1 else math.nan
        table[key] = (
            speeds.mean() if len(speeds) else math.nan,
            std,
            len(speeds),
            len(same),
            max(r["memory_gb"] for r in same),
            same[0]["devices"],
        )
    return table


def markdown(table):
    patterns = list(dict.fromkeys(p for p, _ in table))
    lengths = sorted({n for _, n in table})
    header = [
        "| pattern | " + " | ".join(f"{n:,}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]

    def rows(cell):
        return [
            f"| {p} | "
            + " | ".join(cell(p, n) if (p, n) in table else "not run" for n in lengths)
            + " |"
            for p in patterns
        ]

    speed = lambda p, n: f"{table[p, n][0]:,.0f} ± {table[p, n][1]:,.0f}"
    memory = lambda p, n: f"{table[p, n][4]:.3g}"

    def relative(p, n):
        if ("full", n) not in table:
            return "no baseline"
        return f"{table[p, n][0] / table['full', n][0]:.2f}x"

    steps = sorted({table[k][2] for k in table})
    seeds = sorted({table[k][3] for k in table})
    devices = next(iter(table.values()))[5]  # one count for the whole table (summarize)
    return (
        "\n".join(
            [
                f"Training tokens/s: mean ± sample standard deviation over the timed steps ({steps[0]} "
                f"to {steps[-1]} per cell, from {seeds[-1]} seed(s)); the first step of each run "
                f"(compilation) is not timed. Data parallel over {devices} device(s).",
                "",
            ]
            + header
            + rows(speed)
            + [
                "",
                "Peak memory of the compiled training step on one device, GB (10^9 bytes), by XLA's "
                "buffer assignment: arguments + outputs - donated + temporaries.",
                "",
            ]
            + header
            + rows(memory)
            + ["", "Tokens/s relative to full attention at the same length.", ""]
            + header
            + rows(relative)
        )
        + "\n"
    )


def plot(table, path):
    """Tokens/s (error bars: std over steps) and peak memory against length, a line per pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pattern in dict.fromkeys(p for p, _ in table):
        keys = sorted(k for k in table if k[0] == pattern)
        lengths = [n for _, n in keys]
        style = dict(
            marker="o",
            label=pattern,
            color="black" if pattern == "full" else None,
            linestyle="--" if pattern == "full" else "-",
        )
        ax_speed.errorbar(
            lengths,
            [table[k][0] for k in keys],
            yerr=[table[k][1] for k in keys],
            capsize=3,
            **style,
        )
        ax_memory.plot(lengths, [table[k][4] for k in keys], **style)
    ax_speed.set(ylabel="training tokens/s", title="Speed of a training step")
    ax_memory.set(
        yscale="log", ylabel="peak memory per device (GB)", title="Memory of a training step (XLA)"
    )
    for ax in (ax_speed, ax_memory):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3)
    ax_speed.legend(title="pattern", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(workdir):
    """Writes speed.md, speed.csv and speed.png into `workdir` from its finished runs."""
    table = summarize(finished_runs(workdir))
    if not table:
        raise ValueError(f"no finished run under {workdir}/runs; run the sweep first.")
    with open(os.path.join(workdir, "speed.md"), "w", encoding="utf-8") as f:
        f.write(markdown(table))
    with open(os.path.join(workdir, "speed.csv"), "w", encoding="utf-8") as f:
        f.write(
            "pattern,length,tokens_per_second_mean,tokens_per_second_std,timed_steps,seeds,"
            "peak_memory_gb_per_device,devices\n"
        )
        for (pattern, length), (mean, std, steps, seeds, memory, devices) in table.items():
            f.write(
                f"{pattern},{length},{mean:.1f},{std:.1f},{steps},{seeds},{memory:.4f},{devices}\n"
            )
    plot(table, os.path.join(workdir, "speed.png"))
    return table


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} SWEEP_WORKDIR  (after launch.py --sweep)")
    report(sys.argv[1])
    with open(os.path.join(sys.argv[1], "speed.md"), encoding="utf-8") as f:
        print(f.read())
