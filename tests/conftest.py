"""Shared test set-up: eight CPU devices, so data-parallel code runs as it would on a pod slice,
and compilation cheap enough for a suite of many small programs."""

import os

# Must happen before JAX initialises its backends, hence at import of the first conftest.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are small and run for milliseconds, so compiling them is most of its time,
# and XLA's optimisation passes cost far more than they save here. The tests check what the code
# computes, which the passes do not change beyond float rounding; tests/test_nan_semantics.py
# turns them back on. An environment variable, not jax.config, so the launches that tests run as
# subprocesses compile the same way. (XLA's older CPU fusion emitters would compile faster still,
# but together with this flag they miscompile tests/test_nnx.py's training step.)
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; tests do not go through app.run.
flags.FLAGS.mark_as_parsed()

# CI explores the same examples every run (a red CI is then a change, not a draw); elsewhere
# hypothesis draws new ones, and a failure it finds prints the example to pin as a test.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
