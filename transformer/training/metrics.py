"""Metrics to TensorBoard event files (tensorboardX, no TensorFlow) and to JSON lines.

`workdir/metrics.jsonl` holds one {"step": ..., "split": ..., name: value} object per line, easy to
read back with `read_metrics`; `workdir/tensorboard/` is for `tensorboard --logdir`. Only
process 0 writes.
"""

import json
import os

import jax
import numpy as np


class MetricsWriter:
    """Writes scalar metrics, tagged `split/name`, at a step."""

    def __init__(self, workdir):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        if self._active:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step, split, metrics):
        """Writes {name: scalar} for `split` ("train", "eval", "eval_<name>") at `step`."""
        if not self._active:
            return
        scalars = {name: float(np.asarray(value)) for name, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))
        self._tensorboard.flush()

    def close(self):
        if self._active:
            self._jsonl.close()
            self._tensorboard.close()


def read_metrics(workdir, split=None):
    """The records of `workdir/metrics.jsonl`, optionally only those of one split."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:  # a line cut short by a crash; the run redoes that step
            pass
    return [r for r in records if split is None or r["split"] == split]
