"""Shared test set-up: eight CPU devices, so data-parallel code runs as it would on a pod slice."""

import os

# Must happen before JAX initialises its backends, hence at import of the first conftest.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; tests do not go through app.run.
flags.FLAGS.mark_as_parsed()

# CI explores the same examples every run (a red CI is then a change, not a draw); elsewhere
# hypothesis draws new ones, and a failure it finds prints the example to pin as a test.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
