"""The experiment files under experiments/, loaded as modules (they are not a package)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(
    f
    for f in os.listdir(os.path.join(ROOT, "experiments"))
    if f.endswith(".py") and not f.startswith("_")
)


def load_experiment(file_name):
    path = os.path.join(ROOT, "experiments", file_name)
    spec = importlib.util.spec_from_file_location(file_name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
