"""Associative recall: key-value pairs, then a key; the answer is the value stored with it.

Two layouts. With `length` 0 (the default), adjacent pairs and nothing else:

    k_1 v_1 k_2 v_2 ... k_n v_n q        target: the value v_i with k_i == q

which has 2 * num_pairs + 1 tokens. With `length` > 0, the pairs are spread through filler:
each pair is one token (k_i, v_i), and `length - 1` positions hold the num_pairs pair tokens at
random places and filler `_` everywhere else, then the query:

    _ _ (k_3,v_3) _ _ _ (k_1,v_1) _ ... _ (k_2,v_2) _ _ q

One attention hop from the query to the pair token that holds its key answers it, so what limits
a model is only whether its pattern lets the two meet (the pattern_reach experiment); the
adjacent layout also needs a hop from a value to its key.

Keys within a sequence are distinct, so the answer is unique. The difficulty is `distance`, the
number of positions from the queried key (its pair token) to the query q: every example of a
configuration places its queried pair at exactly that distance (an even one in the adjacent
layout, where 2 means the last pair and 2n the first). Distance 0 draws it for each example,
uniformly over the distances the layout allows: a training set that covers every distance.

Vocabulary: 0 pad, 1 BOS, 2 EOS, 3 CLS, then num_keys key ids, then num_values value ids, and
in the spread layout num_keys * num_values pair ids (key-major) and one filler id. The class of
an example is the index of its value (0 <= target < num_values).
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
    length: int = 0  # 0: adjacent pairs; > 0: pairs spread through filler, `length` tokens
    seed: int = 0

    def validate(self):
        spec.check_int_fields(
            "associative_recall",
            self,
            {
                "num_pairs": 1,
                "distance": 0,
                "num_keys": 1,
                "num_values": 1,
                "length": 0,
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
        if self.length:
            self._validate_spread()
            return
        if self.distance % 2:
            raise ValueError(
                f"associative_recall distance must be even (a key sits at an even distance "
                f"from the query), or 0 for any; got {self.distance}."
            )
        if self.distance > 2 * self.num_pairs:
            # Either field may be the one set on purpose: say what each would need.
            raise ValueError(
                f"associative_recall needs distance <= 2 * num_pairs (the queried key must be "
                f"one of the pairs); got distance={self.distance}, num_pairs={self.num_pairs}: "
                f"num_pairs must be >= {self.distance // 2} for this distance, or distance an "
                f"even number in [2, {2 * self.num_pairs}] for these pairs."
            )

    def _validate_spread(self):
        if self.length < self.num_pairs + 1:
            raise ValueError(
                f"associative_recall length={self.length} cannot hold num_pairs="
                f"{self.num_pairs} pair tokens and the query: length must be >= "
                f"{self.num_pairs + 1}, or 0 for adjacent pairs."
            )
        if self.distance > self.length - 1:
            raise ValueError(
                f"associative_recall distance must be in [1, length - 1] = "
                f"[1, {self.length - 1}] (the queried pair lies before the query), or 0 for "
                f"any; got distance={self.distance}."
            )


def first_value_id(config) -> int:
    return tokenizers.NUM_RESERVED + config.num_keys


def first_pair_id(config) -> int:
    """The id of the pair token (key 0, value 0) in the spread layout; key-major after it."""
    return first_value_id(config) + config.num_values


def filler_id(config) -> int:
    return first_pair_id(config) + config.num_keys * config.num_values


def vocab_size(config) -> int:
    spread = config.num_keys * config.num_values + 1 if config.length else 0
    return tokenizers.NUM_RESERVED + config.num_keys + config.num_values + spread


def draw_spread_example(rng: random.Random, config) -> tuple[np.ndarray, int]:
    """(tokens int32 [length], value index): pair tokens in filler, the query `distance` after
    its pair."""
    keys = rng.sample(range(config.num_keys), config.num_pairs)
    values = [rng.randrange(config.num_values) for _ in range(config.num_pairs)]
    tokens = np.full(config.length, filler_id(config), np.int32)
    distance = config.distance or rng.randint(1, config.length - 1)
    queried_position = config.length - 1 - distance
    others = [p for p in range(config.length - 1) if p != queried_position]
    positions = [queried_position] + rng.sample(others, config.num_pairs - 1)
    for position, key, value in zip(positions, keys, values):
        tokens[position] = first_pair_id(config) + key * config.num_values + value
    tokens[-1] = tokenizers.NUM_RESERVED + keys[0]
    return tokens, values[0]


def draw_example(rng: random.Random, config) -> tuple[np.ndarray, int]:
    """(tokens int32 [2 * num_pairs + 1], value index) with the query `distance` after its key."""
    keys = rng.sample(range(config.num_keys), config.num_pairs)
    values = [rng.randrange(config.num_values) for _ in range(config.num_pairs)]
    distance = config.distance or 2 * rng.randint(1, config.num_pairs)
    queried = config.num_pairs - distance // 2
    tokens = []
    for key, value in zip(keys, values):
        tokens += [tokenizers.NUM_RESERVED + key, first_value_id(config) + value]
    tokens.append(tokenizers.NUM_RESERVED + keys[queried])
    return np.asarray(tokens, np.int32), values[queried]


class AssociativeRecall(tfds.core.GeneratorBasedBuilder):
    """Key-value recall at a chosen distance, generated from a seed."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "`length`: pairs spread through filler.", "1.0.0": "Adjacent pairs."}
    BUILDER_CONFIGS = [
        AssociativeRecallConfig(name="pairs64", description="129 tokens; set `distance`."),
        AssociativeRecallConfig(
            name="spread128",
            length=128,
            num_pairs=4,
            distance=0,
            num_keys=4,
            num_values=8,
            num_train=32_768,
            num_validation=256,
            num_test=256,
            description="4 pair tokens in filler, 128 tokens; every distance.",
        ),
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
        draw = draw_spread_example if c.length else draw_example
        for index, (tokens, value) in generation.split_examples(
            lambda rng: draw(rng, c),
            lambda example: example[0].tobytes(),
            sizes,
            c.seed,
            split,
        ):
            yield index, {"tokens": tokens, "label": value}


def make_encoder(builder, data_config):
    """Stored example -> {"inputs": int32 [length (+1 with [CLS])], "targets": []}."""
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
    vocab_size=lambda c, data_config: vocab_size(c),
    num_classes=lambda c: c.num_values,
    max_length=lambda c: (c.length or 2 * c.num_pairs + 1) + 1,  # + [CLS]
)
