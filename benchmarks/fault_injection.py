"""Fault injection against a small run: does anything get lost, and is any outcome silent?

Each trial launches `launch.py` on the pattern_reach smoke preset (a little longer, and wider so
that its arrays are stored out of line) in a fresh workdir, injects one fault, then runs the same
command again until the run completes, and compares the final checkpoint's digests with those of
an uninterrupted reference run. Faults:

  sigterm          SIGTERM at a random moment (a preemption): saves and stops, then resumes
  sigkill          SIGKILL at a random moment, also during checkpoint writes
  corrupt          8 random bytes of the newest checkpoint's array files overwritten
  damaged_log      a line of metrics.jsonl cut short in the middle of the file
  concurrent       a second launch on the workdir while the first trains
  disk_full        the workdir on a small tmpfs that fills during a save (needs root to mount)

Outcomes: "exact" (the final parameters are bit-identical to the reference), "refused (exit 2)"
for a second writer, "differs" (a silent change: the defect this script looks for), "failed"
(the run could not be completed). The table goes to stdout and to faults.csv in --out.

    python benchmarks/fault_injection.py --trials 3 --out benchmarks/results/faults
"""

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import machine  # this directory's

from transformer.training import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 300
FLAGS = [
    "--config=experiments/pattern_reach.py:smoke",
    f"--config.num_train_steps={STEPS}",
    "--config.checkpoint_every_steps=25",
    "--config.eval_every_steps=100",
    "--config.log_every_steps=10",
    "--config.model.d_model=64",
    "--config.model.num_heads=4",
    "--config.model.d_ff=128",
]


def launch(workdir, data_dir, **popen):
    command = [sys.executable, os.path.join(ROOT, "launch.py"), *FLAGS]
    command += [f"--workdir={workdir}", f"--config.data_dir={data_dir}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def run_to_end(workdir, data_dir, attempts=4):
    """Runs the command until summary.json exists; (exit codes, stderr of the last attempt)."""
    codes, stderr = [], ""
    for _ in range(attempts):
        process = launch(workdir, data_dir)
        _, stderr = process.communicate(timeout=600)
        codes.append(process.returncode)
        if os.path.exists(os.path.join(workdir, "summary.json")):
            break
    return codes, stderr


def final_digests(workdir):
    """The SHA-256 of every array of the final checkpoint, as read back from disk (not the
    digests recorded beside it), sorted; None when there is no final checkpoint."""
    import orbax.checkpoint as ocp

    from transformer.training.checkpoints import digests

    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    if not os.path.isdir(path):
        return None
    try:
        state = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    except Exception as error:  # unreadable: not the reference
        return [f"unreadable: {type(error).__name__}"]
    return sorted(digests(state).values())


def wait_for_training(workdir, process, timeout=300):
    """Returns once the run has saved its first checkpoint (so it is training) or has ended."""
    directory = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
            return
        time.sleep(0.05)


def outcome(workdir, reference):
    digests = final_digests(workdir)
    if digests is None:
        return "failed"
    return "exact" if digests == reference else "differs"


def interrupt(workdir, data_dir, sig, rng):
    """Starts a run and sends it `sig` at a random moment of training; returns its exit code."""
    process = launch(workdir, data_dir)
    wait_for_training(workdir, process)
    time.sleep(rng.uniform(0.0, 3.0))  # anywhere in training, saves included
    process.send_signal(sig)
    process.communicate(timeout=600)
    return process.returncode


def kill_during(workdir, data_dir, sig, rng):
    """Sends `sig` at a random moment of a run, then runs it to the end."""
    first = interrupt(workdir, data_dir, sig, rng)
    codes, _ = run_to_end(workdir, data_dir)
    return [first] + codes


def trial_sigterm(workdir, data_dir, reference, rng):
    codes = kill_during(workdir, data_dir, signal.SIGTERM, rng)
    return outcome(workdir, reference), f"exit codes {codes}"


def trial_sigkill(workdir, data_dir, reference, rng):
    codes = kill_during(workdir, data_dir, signal.SIGKILL, rng)
    return outcome(workdir, reference), f"exit codes {codes}"


def trial_corrupt(workdir, data_dir, reference, rng):
    interrupt(workdir, data_dir, signal.SIGKILL, rng)
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    if not steps:
        return "failed", "no checkpoint to corrupt"
    state = os.path.join(workdir, "checkpoints", str(steps[-1]), "state")
    # Array data and the b-tree that indexes it; a byte is as likely to be hit as any other.
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs if os.path.basename(d) == "d"
    )
    sizes = [os.path.getsize(f) for f in files]
    target = rng.choices(files, weights=sizes)[0]
    at = rng.randrange(max(os.path.getsize(target) - 8, 1))
    with open(target, "r+b") as f:
        f.seek(at)
        f.write(bytes(rng.randrange(256) for _ in range(8)))
    codes, stderr = run_to_end(workdir, data_dir)
    if "does not match the digest" in stderr:
        noticed = "; reported: digests differ"
    elif "cannot be read" in stderr:
        noticed = "; reported: unreadable"
    else:
        noticed = "; not reported"
    aside = os.path.isdir(os.path.join(workdir, "checkpoints_unreadable"))
    where = os.path.relpath(target, state)
    note = f"step {steps[-1]}, {where} at byte {at}: {'set aside' if aside else 'not set aside'}"
    note += noticed
    return outcome(workdir, reference), note + f"; exit codes {codes}"


def trial_damaged_log(workdir, data_dir, reference, rng):
    interrupt(workdir, data_dir, signal.SIGKILL, rng)
    log = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(log):
        with open(log, encoding="utf-8") as f:
            lines = f.readlines()
        if lines:
            index = rng.randrange(len(lines))
            lines[index] = lines[index][: len(lines[index]) // 2] + "\n"
            with open(log, "w", encoding="utf-8") as f:
                f.writelines(lines)
    codes, _ = run_to_end(workdir, data_dir)
    return outcome(workdir, reference), f"exit codes {codes}"


def trial_concurrent(workdir, data_dir, reference, rng):
    first = launch(workdir, data_dir)
    wait_for_training(workdir, first)
    second = launch(workdir, data_dir)
    _, second_err = second.communicate(timeout=600)
    first.communicate(timeout=600)
    refused = second.returncode == 2 and "is in use by process" in second_err
    result = outcome(workdir, reference)
    if refused and result == "exact":
        return "refused (exit 2); first exact", f"second exit {second.returncode}"
    return result, f"second exit {second.returncode}: {second_err.strip()[-200:]}"


def trial_disk_full(workdir, data_dir, reference, rng):
    mount = tempfile.mkdtemp(prefix="faults_tmpfs_")
    size = rng.choice(["150k", "220k", "300k"])
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        os.rmdir(mount)
        return "not run", f"cannot mount a tmpfs here ({error})"
    try:
        run_dir = os.path.join(mount, "run")
        process = launch(run_dir, data_dir)
        _, stderr = process.communicate(timeout=600)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        tracebacks = stderr.count("Traceback")
        subprocess.run(["mount", "-o", "remount,size=64m", mount], check=True)
        codes, _ = run_to_end(run_dir, data_dir)
        result = outcome(run_dir, reference)
        shutil.copytree(run_dir, workdir, dirs_exist_ok=True)
        note = (
            f"tmpfs {size}: exit {process.returncode}, {len(errors)} error line(s), "
            f"{tracebacks} traceback(s); after space was added: exit codes {codes}"
        )
        return result, note
    finally:
        subprocess.run(["umount", mount], check=False)
        os.rmdir(mount)


TRIALS = {
    "sigterm": trial_sigterm,
    "sigkill": trial_sigkill,
    "corrupt": trial_corrupt,
    "damaged_log": trial_damaged_log,
    "concurrent": trial_concurrent,
    "disk_full": trial_disk_full,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials of each fault")
    parser.add_argument("--faults", default=",".join(TRIALS), help="comma-separated faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for faults.csv")
    args = parser.parse_args()
    faults = args.faults.split(",")
    unknown = sorted(set(faults) - set(TRIALS))
    if unknown:
        parser.error(f"unknown faults {unknown}; allowed: {', '.join(TRIALS)}")
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="faults_")
    data_dir = os.path.join(root, "data")
    print(provenance.describe(), flush=True)
    codes, stderr = run_to_end(os.path.join(root, "reference"), data_dir, attempts=1)
    reference = final_digests(os.path.join(root, "reference"))
    if reference is None:
        sys.exit(f"the reference run failed (exit {codes}):\n{stderr[-2000:]}")
    rows = []
    for fault in faults:
        for index in range(args.trials):
            workdir = os.path.join(root, f"{fault}_{index}")
            result, note = TRIALS[fault](workdir, data_dir, reference, rng)
            rows.append({"fault": fault, "trial": index, "outcome": result, "note": note})
            print(f"{fault:12s} {index:3d}  {result:32s} {note}", flush=True)
    print("\n| fault | trials | outcomes |\n|---|---|---|")
    for fault in faults:
        counts = Counter(r["outcome"] for r in rows if r["fault"] == fault)
        text = ", ".join(f"{name}: {n}" for name, n in counts.most_common())
        print(f"| {fault} | {sum(counts.values())} | {text} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        columns = machine.columns()
        with open(os.path.join(args.out, "faults.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["fault", "trial", "outcome", "note", *columns])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, **columns})
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
