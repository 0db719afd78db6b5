"""Associative recall: key-value pairs, then a key; the answer is the value stored with it.

    k_1 v_1 k_2 v_2 ... k_n v_n q        target: the value v_i with k_i == q

Keys within a sequence are distinct, so the answer is unique. The difficulty is `distance`, the
number of positions from the queried key k_i to the query q (so 2 means the last pair, 2n the
first): every example of a configuration places its queried pair at exactly that distance. The
sequence has 2 * num_pairs + 1 tokens.

Vocabulary: 0 pad, 1 BOS, 2 EOS, 3 CLS, then num_keys key ids, then num_values value ids.
The class of an example is the index of its value (0 <= target < num_values).
"""

import dataclasses
import random

import numpy as np
import tensorflow_datasets as tfds

from transformer.data import generation, spec, tokenizers


@dataclasses.dataclass
class AssociativeRecallConfig(tfds.core.BuilderConfig):
    num_pairs: int = 64
    distance: int = 64
    num_keys: int = 128
    num_values: int = 16
    num_train: int = 20_000
    num_validation: int = 1_000
    num_test: int = 1_000
    seed: int = 0

    def validate(self):
        spec.check_int_fields(
            "associative_recall",
            self,
            {
                "num_pairs": 1,
                "distance": 2,
                "num_keys": 1,
                "num_values": 1,
                **generation.SPLIT_FIELD_MINIMUMS,
            },
        )
        if self.num_keys < self.num_pairs:
            raise ValueError(
                f"associative_recall needs num_keys >= num_pairs (keys are distinct within a "
                f"sequence); got num_keys={self.num_keys}, num_pairs={self.num_pairs}: "
                f"num_pairs must be <= {self.num_keys} for these keys, or num_keys >= "
                f"{self.num_pairs} for these pairs."
            )
        if self.distance % 2:
            raise ValueError(
                f"associative_recall distance must be even (a key sits at an even distance "
                f"from the query); got {self.distance}."
            )
        if self.distance > 2 * self.num_pairs:
            # Either field may be the one set on purpose: say what each would need.
            raise ValueError(
                f"associative_recall needs distance <= 2 * num_pairs (the queried key must be "
                f"one of the pairs); got distance={self.distance}, num_pairs={self.num_pairs}: "
                f"num_pairs must be >= {self.distance // 2} for this distance, or distance an "
                f"even number in [2, {2 * self.num_pairs}] for these pairs."
            )


def first_value_id(config) -> int:
    return tokenizers.NUM_RESERVED + config.num_keys


def draw_example(rng: random.Random, config) -> tuple[np.ndarray, int]:
    """(tokens int32 [2 * num_pairs + 1], value index) with the query `distance` after its key."""
    keys = rng.sample(range(config.num_keys), config.num_pairs)
    values = [rng.randrange(config.num_values) for _ in range(config.num_pairs)]
    queried = config.num_pairs - config.distance // 2
    tokens = []
    for key, value in zip(keys, values):
        tokens += [tokenizers.NUM_RESERVED + key, first_value_id(config) + value]
    tokens.append(tokenizers.NUM_RESERVED + keys[queried])
    return np.asarray(tokens, np.int32), values[queried]


class AssociativeRecall(tfds.core.GeneratorBasedBuilder):
    """Key-value recall at a chosen distance, generated from a seed."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        AssociativeRecallConfig(name="pairs64", description="129 tokens; set `distance`."),
        AssociativeRecallConfig(
            name="pairs512",
            num_pairs=512,
            distance=512,
            num_keys=1024,
            description="1025 tokens; set `distance`.",
        ),
        AssociativeRecallConfig(
            name="tiny",
            num_pairs=8,
            distance=6,
            num_keys=16,
            num_values=4,
            num_train=200,
            num_validation=50,
            num_test=50,
            description="For tests.",
        ),
    ]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_values),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in generation.SPLITS_IN_ORDER}

    def _generate_examples(self, split):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        for index, (tokens, value) in generation.split_examples(
            lambda rng: draw_example(rng, c),
            lambda example: example[0].tobytes(),
            sizes,
            c.seed,
            split,
        ):
            yield index, {"tokens": tokens, "label": value}


def make_encoder(builder, data_config):
    """Stored example -> {"inputs": int32 [2 * num_pairs + 1 (+1 with [CLS])], "targets": []}."""
    del builder
    prefix = np.asarray([tokenizers.CLS_ID] if data_config.add_cls else [], np.int32)

    def encode(example):
        return {
            "inputs": np.concatenate([prefix, np.asarray(example["tokens"], np.int32)]),
            "targets": np.asarray(example["label"], np.int32),
        }

    return encode


SPEC = spec.DatasetSpec(
    builder=AssociativeRecall,
    task=spec.CLASSIFICATION,
    make_encoder=make_encoder,
    vocab_size=lambda c, data_config: tokenizers.NUM_RESERVED + c.num_keys + c.num_values,
    num_classes=lambda c: c.num_values,
    max_length=lambda c: 2 * c.num_pairs + 2,  # + [CLS]
)
