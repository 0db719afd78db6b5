"""Shared test set-up: eight CPU devices, so data-parallel code runs as it would on a pod slice,
and compilation cheap enough for a suite of many small programs."""

import os

# The suite's programs are small and run for milliseconds, so compiling them is most of its time.
# Two settings make compiling cheaper than it is for users; the tests check what the code
# computes, which neither changes beyond float rounding, and tests/test_nan_semantics.py compiles
# as users do. XLA's optimisation passes cost far more than they save here. And XLA:CPU's older
# fusion emitters (`--xla_cpu_use_fusion_emitters=false`) compile each fused kernel about three
# times faster than the default MLIR emitters, which build a pass pipeline per kernel. Environment
# variables, not jax.config, so the launches that tests run as subprocesses compile the same way
# (tests/xla_flags.py keeps the flags when a subprocess asks for another device count). Both must
# be set before JAX initialises its backends, hence at import of the first conftest.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def _share_the_cores_between_workers():
    """Under pytest-xdist, worker i of n runs on every n-th core, from the i-th: XLA sizes its
    thread pools by the cores a process may use, so each worker then keeps to its share instead
    of every worker's pool contending for all the cores. The launches a test starts inherit it.
    Must happen before JAX starts its backend, as the flags above."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker[2:]) % count
    os.sched_setaffinity(0, cores[index % len(cores) :: count])


_share_the_cores_between_workers()

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; tests do not go through app.run.
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

# CI explores the same examples every run (a red CI is then a change, not a draw); elsewhere
# hypothesis draws new ones, and a failure it finds prints the example to pin as a test.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


_UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup`, pytest-xdist appends each test's `xdist_group` to its id, and
    the scheduler keeps the tests of a group on one worker by it. If a pytest release changes how
    ids are stored (pytest 9.2 with pytest-xdist 3.8: pytest-xdist#1386), the marks are ignored
    with no message and every grouped fixture is built once per worker: those tests fail instead
    (an error raised here would reach the user only as xdist's internal error)."""
    if not config.getoption("loadgroup", default=False):  # set on a loadgroup run's workers
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rpartition("]")[2]:
            item.stash[_UNGROUPED] = (
                f"--dist loadgroup ignored this test's xdist_group: pytest {pytest.__version__} "
                "and the installed pytest-xdist do not work together. Install the versions "
                'setup.py allows: pip install -e ".[dev]".'
            )


@pytest.fixture(autouse=True)
def _grouped_as_marked(request):
    """Fails a test that the run ignored the xdist_group of (pytest_collection_modifyitems)."""
    if _UNGROUPED in request.node.stash:
        pytest.fail(request.node.stash[_UNGROUPED], pytrace=False)
