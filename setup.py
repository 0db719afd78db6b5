"""Installs the `transformer` package: attention and transformers in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="transformer",
    version="0.1.0",
    description=(
        "Attention as it is taught, and attention patterns that really skip work, in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["transformer", "transformer.*"]),
    install_requires=[
        "numpy>=1.26,<3",
        "jax>=0.10.0,<0.11",  # chunked attention uses the 0.10 varying-axis API
        # JAX's dtype extension; 0.7.0 takes seconds to import (0.6.0: milliseconds), which every
        # launch, sweep worker and test process pays.
        "ml_dtypes>=0.5,<0.7",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "tensorflow-datasets>=4.9.9,<4.10",
        "importlib_resources>=6.0",  # TFDS 4.9.10 imports it for builders inside a package
        "absl-py>=2.1,<3",
        "ml-collections>=1.0,<2",
        "grain>=0.2.12,<0.3",
        "matplotlib>=3.8,<4",
        "sentencepiece>=0.2,<0.3",  # translation vocabulary, trained on the training split
        "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow
        "tqdm>=4.60",  # the progress bar on a terminal
        "sacrebleu>=2.4,<3",  # BLEU of the translation experiment
    ],
    extras_require={
        "dev": [
            # pytest 9.2 gives nodes structured ids, which pytest-xdist 3.8's loadgroup does not
            # update: `xdist_group` marks are then silently ignored (pytest-xdist#1386).
            "pytest>=8,<9.2",
            "pytest-xdist>=3.6,<4",  # the suite on both cores: -n 2
            "hypothesis>=6.100,<7",
            "ruff>=0.17,<0.18",  # the one formatter and linter (ruff.toml); minor versions reformat
        ],
        # The PyTorch peers benchmarks/peers.py times beside this codebase; the package never
        # imports torch. Here pip takes the CPU build from the local wheels (docs/benchmarks.md).
        "benchmarks": ["torch==2.13.*"],
        "tpu": ["jax[tpu]>=0.10.0,<0.11"],
        "cuda": ["jax[cuda12]>=0.10.0,<0.11"],
    },
)
