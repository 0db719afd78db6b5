"""Copy or reverse a random sequence: a sequence-to-sequence task whose difficulty is its length.

    inputs:  s_1 s_2 ... s_n EOS
    targets: s_1 s_2 ... s_n EOS      (copy)
             s_n ... s_2 s_1 EOS      (reverse)

Read as one sequence (inputs then targets, as a decoder-only model sees it), every copied token
sits n + 1 positions after the token it repeats; a reversed token sits 1 to 2n + 1 positions
after it, so reversal mixes short and long distances. The length n is drawn uniformly from
[min_length, max_length] (set both equal for one fixed distance).

Vocabulary: 0 pad, 1 BOS, 2 EOS, 3 CLS (unused), then num_symbols symbol ids.
"""

import dataclasses
import random

import numpy as np
import tensorflow_datasets as tfds

from transformer.data import generation, spec, tokenizers


@dataclasses.dataclass
class CopyReverseConfig(tfds.core.BuilderConfig):
    reverse: bool = False
    min_length: int = 64
    max_length: int = 64
    num_symbols: int = 16
    num_train: int = 20_000
    num_validation: int = 1_000
    num_test: int = 1_000
    seed: int = 0

    def validate(self):
        spec.check_int_fields(
            "copy_reverse",
            self,
            {"min_length": 1, "max_length": 1, "num_symbols": 2, **generation.SPLIT_FIELD_MINIMUMS},
        )
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                f"copy_reverse needs 1 <= min_length <= max_length, got "
                f"{self.min_length}, {self.max_length}."
            )
        if self.num_symbols < 2:
            raise ValueError(f"copy_reverse needs num_symbols >= 2, got {self.num_symbols}.")


def draw_example(rng: random.Random, config) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), int32 [n + 1] each, both ending with EOS."""
    length = rng.randint(config.min_length, config.max_length)
    symbols = [tokenizers.NUM_RESERVED + rng.randrange(config.num_symbols) for _ in range(length)]
    targets = symbols[::-1] if config.reverse else symbols
    return (
        np.asarray(symbols + [tokenizers.EOS_ID], np.int32),
        np.asarray(targets + [tokenizers.EOS_ID], np.int32),
    )


class CopyReverse(tfds.core.GeneratorBasedBuilder):
    """Random symbol sequences and their copy or reversal, generated from a seed."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        CopyReverseConfig(name="copy64", description="Copy 64 symbols."),
        CopyReverseConfig(name="reverse64", reverse=True, description="Reverse 64 symbols."),
        CopyReverseConfig(
            name="copy512", min_length=512, max_length=512, description="Copy 512 symbols."
        ),
        CopyReverseConfig(
            name="reverse512",
            reverse=True,
            min_length=512,
            max_length=512,
            description="Reverse 512 symbols.",
        ),
        CopyReverseConfig(
            name="tiny",
            reverse=True,
            min_length=3,
            max_length=12,
            num_symbols=8,
            num_train=200,
            num_validation=50,
            num_test=50,
            description="For tests: reverse 3 to 12 symbols.",
        ),
    ]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "targets": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in generation.SPLITS_IN_ORDER}

    def _generate_examples(self, split):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        for index, (inputs, targets) in generation.split_examples(
            lambda rng: draw_example(rng, c),
            lambda example: example[0].tobytes(),
            sizes,
            c.seed,
            split,
        ):
            yield index, {"inputs": inputs, "targets": targets}


def make_encoder(builder, data_config):
    """Stored example -> {"inputs": int32 [n + 1], "targets": int32 [n + 1]}, as generated."""
    del builder, data_config
    return lambda example: {
        "inputs": np.asarray(example["inputs"], np.int32),
        "targets": np.asarray(example["targets"], np.int32),
    }


SPEC = spec.DatasetSpec(
    builder=CopyReverse,
    task=spec.SEQ2SEQ,
    make_encoder=make_encoder,
    vocab_size=lambda c, data_config: tokenizers.NUM_RESERVED + c.num_symbols,
    max_length=lambda c: c.max_length + 1,
    max_target_length=lambda c: c.max_length + 1,
)
