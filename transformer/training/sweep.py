"""Runs every variant of an experiment over several seeds, and writes the results.

    python launch.py --config=experiments/pattern_reach.py:cpu --sweep --workdir=DIR

`config.sweep` of the experiment says what to run and what to report:
  variants   names that `get_config("<preset>,<variant>")` accepts
  seeds      each variant is trained once per seed
  metrics    result keys ("eval/accuracy", ...) for the table: mean and spread over seeds
  plot       (optional) points ((x, result key), ...), series and panel (config fields of the
             runs, e.g. "model.pattern", "model.num_layers"), x_label, y_label: see `plot`.
  speed_plot (optional) a result key: speed.png plots it against training tokens/s, one point
             per variant, what each costs against what it buys (see `speed_plot`).

Each run trains in `DIR/runs/<variant>/seed_<seed>/`. A run whose summary.json exists is not
redone, and results.md, results.csv, runs.csv and plot.png are rewritten after every run, so a
crash loses at most the run in progress (which itself resumes from its last checkpoint).
"""

import csv
import json
import os
import tempfile
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from transformer.training import loop, provenance, workdir_lock
from transformer.training.config_schema import differences


class Run(NamedTuple):
    variant: str
    seed: int
    config: Any  # the run's full ConfigDict
    run_dir: str


class SweepPlan(NamedTuple):
    """What a sweep will do, checked before it trains anything."""

    spec: Any  # the preset's `config.sweep`: variants, seeds, metrics, plot
    preset_json: dict  # the preset's config, against which each variant's changes are listed
    overrides: dict  # {dotted field: value} from the command line, the same in every run
    runs: list  # [Run] in the order they train


def plan_runs(get_config, preset, workdir, overrides=None):
    """Every (variant, seed) of `get_config(preset).sweep`, each config checked whole.

    Args:
      get_config: the experiment's `get_config(arg)`; arg is "<preset>,<variant>".
      preset: the preset (e.g. "cpu", "smoke") the variants build on.
      workdir: where the runs and the results go.
      overrides: {dotted field: value} applied to every run's config (command-line overrides).

    Raises a ValueError naming the first mistake (`loop.prepare` on every variant's config, and a
    finished run whose config the experiment no longer gives) before anything is trained.
    """
    overrides = dict(overrides or {})
    preset_config = get_config(preset)
    runs = []
    for variant in preset_config.sweep.variants:
        for index, seed in enumerate(preset_config.sweep.seeds):
            config = get_config(f"{preset},{variant}")
            config.update_from_flattened_dict(overrides)
            config.seed = seed
            run_dir = os.path.join(workdir, "runs", variant, f"seed_{seed}")
            summary = _finished_summary(run_dir)
            if summary is not None:
                _check_same_config(summary["config"], config, run_dir)
            elif index == 0:  # seeds change nothing that prepare checks
                try:
                    loop.prepare(config, run_dir)
                except ValueError as error:
                    raise ValueError(f"variant {variant!r}: {error}") from error
            runs.append(Run(variant, seed, config, run_dir))
    preset_json = json.loads(preset_config.to_json_best_effort())
    return SweepPlan(preset_config.sweep, preset_json, overrides, runs)


def run_planned(plan, workdir):
    """Trains the runs of `plan` (from `plan_runs`) that are not finished, and writes the results.

    Each run trains in `workdir/runs/<variant>/seed_<seed>/`, holding that run's lock. A run that
    another process (another sweep on the same workdir) is training is left to it and read back
    once it is done, so two sweeps share the work instead of repeating it. Returns the list of
    per-run records (variant, seed, config, results) in the plan's order; stops early, returning
    None, when a run was stopped by SIGTERM (run the same command again to resume).
    """
    summaries = {}  # run index -> summary
    deferred = []
    for index, run in enumerate(plan.runs):
        try:
            summary = _summary(run, wait=False)
        except workdir_lock.WorkdirBusyError:
            logging.info(
                "sweep: %s seed %d is being trained by another process; later",
                run.variant,
                run.seed,
            )
            deferred.append(index)
            continue
        if summary is None:
            return None
        summaries[index] = summary
        write_results(_records(plan, summaries), plan.spec, workdir)
    for index in deferred:
        summary = _summary(plan.runs[index], wait=True)
        if summary is None:
            return None
        summaries[index] = summary
        write_results(_records(plan, summaries), plan.spec, workdir)
    return _records(plan, summaries)


# How often a sweep looks again at a run that another process is training.
_BUSY_POLL_SECONDS = 5.0


def _summary(run, wait):
    """The run's summary: read back when it finished, else trained here. None when training was
    stopped by SIGTERM. When another process holds the run, raises WorkdirBusyError, or with
    `wait` waits for it to finish (or die) and reads back its result, or trains what it left."""
    while True:
        summary = _finished_summary(run.run_dir)
        if summary is not None:
            logging.info("sweep: %s seed %d is done", run.variant, run.seed)
            return summary
        logging.info("sweep: training %s, seed %d", run.variant, run.seed)
        try:
            summary = loop.train_and_evaluate(run.config, run.run_dir).summary
        except workdir_lock.WorkdirBusyError:
            if not wait:
                raise
            time.sleep(_BUSY_POLL_SECONDS)
            continue
        if summary["status"] != "completed":
            logging.warning(
                "sweep stopped during %s seed %d; run again to resume.", run.variant, run.seed
            )
            return None
        return summary


def _records(plan, summaries):
    """The per-run records of the finished runs, in the plan's order."""
    records = []
    for index, run in enumerate(plan.runs):
        if index not in summaries:
            continue
        summary = summaries[index]
        changes = [
            (f, new)
            for f, _, new in differences(plan.preset_json, summary["config"])
            if f != "seed" and f.split(".")[0] not in overrides_roots(plan.overrides)
        ]
        records.append(
            {
                "variant": run.variant,
                "seed": run.seed,
                "config": summary["config"],
                "changes": changes,
                "results": summary["final"],
                "tokens_per_second": summary["tokens_per_second"],
                "machine": summary.get("machine"),
            }
        )
    return records


def run_sweep(get_config, preset, workdir, overrides=None):
    """`plan_runs` then `run_planned`: checks every run's config, then trains them."""
    return run_planned(plan_runs(get_config, preset, workdir, overrides), workdir)


def overrides_roots(overrides):
    """Top-level fields set on the command line: the same in every run, not a variant's own."""
    return {key.split(".")[0] for key in (overrides or {})}


def _check_same_config(finished, config, run_dir):
    """A finished run is reused only if the experiment still asks for exactly its config.

    The sweep plan (`sweep`: which variants, seeds and metrics) is not part of what a run
    trains, so adding or dropping variants keeps the runs already finished. Nor is a field that
    the finished run's config lacks and the new one leaves empty (None, {} or []): a field added
    to the code since, whose empty default switches nothing on."""
    wanted = json.loads(config.to_json_best_effort())
    changed = [
        (f, old, new)
        for f, old, new in differences(
            {k: v for k, v in finished.items() if k != "sweep"},
            {k: v for k, v in wanted.items() if k != "sweep"},
        )
        if not (old is None and new in (None, {}, []) and not _has_field(finished, f))
    ]
    if changed:
        details = "; ".join(f"{f}: {old!r} -> {new!r}" for f, old, new in changed[:5])
        raise ValueError(
            f"the finished run in {run_dir} used another config than the experiment "
            f"now gives ({details}); sweep into a new --workdir, or delete that run "
            "to redo it."
        )


def _has_field(config, dotted):
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def _finished_summary(run_dir):
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)
    return summary if summary.get("status") == "completed" else None


def field(config, dotted):
    """The value at a dotted path of a nested dict, e.g. "model.num_layers"."""
    for part in dotted.split("."):
        config = config[part]
    return config


SPEED = "train tokens/s"  # a column of every sweep table, beside the metrics


def aggregate(records, metrics):
    """[{variant, n, <metric>: (mean, std), SPEED: (mean, std)}] in the order variants first
    appear."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    rows = []
    for variant in variants:
        runs = [r for r in records if r["variant"] == variant]
        row = {"variant": variant, "n": len(runs)}
        for metric in metrics:
            # NaN for a metric a run did not produce (a run resumed at its end trains no step,
            # so it has no train/* metrics): shown as nan rather than a crash or a made-up value.
            values = np.array([r["results"].get(metric, np.nan) for r in runs], np.float64)
            # Sample standard deviation over seeds (0 with a single seed).
            row[metric] = (values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0)
        # Training speed over the whole run; a run resumed at its end timed no step (None).
        speeds = np.array([r.get("tokens_per_second") for r in runs if r.get("tokens_per_second")])
        row[SPEED] = (
            (speeds.mean(), speeds.std(ddof=1) if len(speeds) > 1 else 0.0)
            if len(speeds)
            else (np.nan, np.nan)
        )
        rows.append(row)
    return rows


def write_results(records, plan, workdir):
    """results.md (mean ± std over seeds), results.csv (the same), runs.csv (every run), plot.png.

    Written by process 0 only; every file is replaced atomically.
    """
    if jax.process_index() != 0:
        return
    metrics = list(plan.metrics)
    rows = aggregate(records, metrics)
    _replace(os.path.join(workdir, "results.md"), markdown_table(rows, metrics, plan, records))
    columns = metrics + [SPEED]
    with _replacing(os.path.join(workdir, "results.csv")) as f:
        writer = csv.writer(f)
        writer.writerow(
            ["variant", "seeds"]
            + [f"{m} {s}" for m in columns for s in ("mean", "std")]
            + ["machines"]
        )
        for row in rows:
            runs = [r for r in records if r["variant"] == row["variant"]]
            writer.writerow(
                [row["variant"], row["n"]]
                + [f"{v:.6g}" for m in columns for v in row[m]]
                + [" | ".join(machines(runs))]
            )
    with _replacing(os.path.join(workdir, "runs.csv")) as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "tokens_per_second"] + metrics + ["machine"])
        for r in records:
            speed = r["tokens_per_second"]  # None when the run was not timed (resumed at its end)
            writer.writerow(
                [r["variant"], r["seed"], "" if speed is None else f"{speed:.1f}"]
                + [f"{r['results'].get(m, np.nan):.6g}" for m in metrics]
                + machines([r])
            )
    if "plot" in plan and plan.plot:
        plot(records, plan.plot, os.path.join(workdir, "plot.png"))
    if plan.get("speed_plot"):
        speed_plot(rows, plan.speed_plot, os.path.join(workdir, "speed.png"))


def machines(records):
    """The distinct machines (`provenance.describe`) that the records' runs trained on."""
    described = [
        provenance.describe(r["machine"]) if r.get("machine") else "machine not recorded"
        for r in records
    ]
    return list(dict.fromkeys(described))


def markdown_table(rows, metrics, plan, records):
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"Mean ± sample standard deviation over seeds {seeds}; every run's config is in "
        "runs/<variant>/seed_<seed>/config.json.",
        "",
        "| variant | runs | " + " | ".join(metrics) + f" | {SPEED} |",
        "|---|---|" + "---|" * (len(metrics) + 1),
    ]
    for row in rows:
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in metrics]
        cells.append(f"{row[SPEED][0]:,.0f} ± {row[SPEED][1]:,.0f}")
        lines.append(f"| {row['variant']} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "What each variant changes in the preset's config:", ""]
    for variant in dict.fromkeys(r["variant"] for r in records):
        changes = next(r["changes"] for r in records if r["variant"] == variant)
        text = ", ".join(f"{f}={v!r}" for f, v in changes) or "nothing"
        lines.append(f"- {variant}: {text}")
    lines += ["", "Trained on (CPU, cores, devices; library versions):", ""]
    lines += [f"- {machine}" for machine in machines(records)]
    return "\n".join(lines) + "\n"


def plot(records, spec, path):
    """Result against x, one line per `spec.series` value, a panel per `spec.panel` value.

    spec.points: ((x, result key), ...), e.g. ((2, "eval_d2/accuracy"), (8, "eval_d8/accuracy"));
    spec.series, spec.panel: dotted config fields of the runs ("" for no panels); spec.x_label,
    spec.y_label: axis labels. Points are means over seeds, error bars their standard deviation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({field(r["config"], spec.panel) for r in records}) if spec.panel else [None]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True
    )
    xs = [x for x, _ in spec.points]
    # One colour per series value across every panel, so that one legend reads them all.
    every_series = list(dict.fromkeys(field(r["config"], spec.series) for r in records))
    colours = {s: f"C{i % 10}" for i, s in enumerate(every_series)}
    for ax, panel in zip(axes[0], panels):
        runs = [r for r in records if panel is None or field(r["config"], spec.panel) == panel]
        for series in dict.fromkeys(field(r["config"], spec.series) for r in runs):
            values = np.array(
                [
                    [r["results"].get(key, np.nan) for _, key in spec.points]
                    for r in runs
                    if field(r["config"], spec.series) == series
                ]
            )  # [seeds, points]
            stds = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(xs))
            ax.errorbar(
                xs,
                values.mean(axis=0),
                yerr=stds,
                marker="o",
                capsize=3,
                color=colours[series],
                label=str(series),
            )
        ax.set_xlabel(spec.x_label)
        ax.set_title(f"{spec.panel.split('.')[-1]} = {panel}" if spec.panel else "")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(spec.y_label)
    handles = [plt.Line2D([], [], color=colours[s], marker="o", label=str(s)) for s in every_series]
    axes[0][-1].legend(handles=handles, title=spec.series.split(".")[-1], fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def speed_plot(rows, metric, path):
    """`metric` against training tokens/s, a point per variant (rows of `aggregate`), each with
    its spread over seeds on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4.5))
    for i, row in enumerate(rows):
        (speed, speed_std), (value, value_std) = row[SPEED], row[metric]
        ax.errorbar(
            speed, value, xerr=speed_std, yerr=value_std, marker="o", capsize=3, color=f"C{i % 10}"
        )
        ax.annotate(row["variant"], (speed, value), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(SPEED)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    _save(figure, path)


def _save(figure, path):
    """Writes the figure to `path` through a temporary file beside it (never half a PNG)."""
    import matplotlib.pyplot as plt

    handle, temporary = tempfile.mkstemp(
        suffix=".png", prefix="plot.", dir=os.path.dirname(os.path.abspath(path))
    )
    os.close(handle)
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


class _replacing:
    """Opens a uniquely named temporary file beside `path` and renames it over `path` on
    success: a crash never leaves a half-written results file, and two writers never share a
    temporary file."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        handle, self.temporary = tempfile.mkstemp(
            prefix=os.path.basename(self.path) + ".", dir=directory
        )
        self.file = os.fdopen(handle, "w", encoding="utf-8", newline="")
        return self.file

    def __exit__(self, exc_type, *exc):
        self.file.close()
        if exc_type is None:
            os.replace(self.temporary, self.path)
        else:
            os.remove(self.temporary)


def _replace(path, text):
    with _replacing(path) as f:
        f.write(text)
