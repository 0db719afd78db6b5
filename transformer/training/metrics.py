"""Metrics to TensorBoard event files (tensorboardX, no TensorFlow) and to JSON lines.

`workdir/metrics.jsonl` holds one {"step": ..., "split": ..., name: value} object per line, easy to
read back with `read_metrics`; `workdir/tensorboard/` is for `tensorboard --logdir`. Only
process 0 writes.

The log survives faults. A line cut short (a crash, a full disk) or otherwise damaged anywhere in
the file is skipped when reading, with a warning. When a run resumes from the checkpoint at step
s, the rows past s are taken out of metrics.jsonl (the steps after s are trained again and logged
anew) and TensorBoard purges its events past s; the rows taken out, and any damaged lines, are
appended to `metrics.jsonl.dropped`, so nothing once written is lost.
"""

import json
import os
import tempfile

import jax
import numpy as np
from absl import logging

LOG = "metrics.jsonl"
DROPPED = "metrics.jsonl.dropped"


def _parse(line):
    """The record of one line, or None when the line is damaged."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or "step" not in record or "split" not in record:
        return None
    return record


def _keep_up_to(workdir, step):
    """Rewrites metrics.jsonl without rows past `step` and without damaged lines; what it takes
    out goes to metrics.jsonl.dropped. Does nothing when there is nothing to take out."""
    path = os.path.join(workdir, LOG)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    kept, dropped = [], []
    for line in lines:
        record = _parse(line)
        (kept if record is not None and record["step"] <= step else dropped).append(line)
    if not dropped:
        return
    with open(os.path.join(workdir, DROPPED), "a", encoding="utf-8") as f:
        f.writelines(dropped)
        f.flush()
        os.fsync(f.fileno())
    handle, temporary = tempfile.mkstemp(prefix=LOG + ".", dir=workdir)
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(temporary, path)
    logging.info(
        "metrics.jsonl: %d rows past step %d or damaged moved to %s", len(dropped), step, DROPPED
    )


class MetricsWriter:
    """Writes scalar metrics, tagged `split/name`, at a step.

    resume_step: the step training resumes from (0 for a fresh start); the log's rows past it
    are taken out first (see the module docstring).
    """

    def __init__(self, workdir, resume_step=0):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        if self._active:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            os.makedirs(workdir, exist_ok=True)
            _keep_up_to(workdir, resume_step)
            self._jsonl = open(os.path.join(workdir, LOG), "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1
            )

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
    """The records of `workdir/metrics.jsonl`, optionally only those of one split; damaged lines
    are skipped, with a warning."""
    path = os.path.join(workdir, LOG)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    records = [_parse(line) for line in lines]
    damaged = sum(record is None for record in records)
    if damaged:
        logging.warning("%s: %d damaged line(s) skipped", path, damaged)
    return [r for r in records if r is not None and (split is None or r["split"] == split)]
