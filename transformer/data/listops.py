"""ListOps as the Long Range Arena defines it (Tay et al., 2020; Nangia & Bowman, 2018).

An example is a nested expression over digits 0-9, written in prefix form with closing brackets:

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

Operators: MIN, MAX, MED (the median, rounded down as LRA's `int(np.median(...))`) and SM (sum
modulo 10). The label, one of 10 classes, is the value of the expression. Trees are drawn as in
LRA's generator: a node below the maximum depth is an operator with probability 0.25, otherwise
a digit; an operator has 2 to `max_args` arguments; expressions are redrawn until their length in
tokens (operators, digits and closing brackets) lies strictly between min_length and max_length,
both excluded as in LRA's generator (501 to 1,999 tokens at its 500 and 2,000).

LRA's files also wrap every node in parentheses; they carry no information and are not tokens
here. The vocabulary is fixed (LRA built it from the data at run time):

    0 pad, 1 BOS, 2 EOS, 3 CLS, 4-13 digits '0'-'9', 14 '[MIN', 15 '[MAX', 16 '[MED', 17 '[SM',
    18 ']'
"""

import dataclasses
import random

import numpy as np
import tensorflow_datasets as tfds

from transformer.data import generation, spec, tokenizers

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
TOKENS = (
    ("<pad>", "<bos>", "<eos>", "<cls>") + tuple(str(d) for d in range(10)) + OPERATORS + (CLOSE,)
)
TOKEN_IDS = {token: i for i, token in enumerate(TOKENS)}
VOCAB_SIZE = len(TOKENS)
NUM_CLASSES = 10
OPERATOR_PROBABILITY = 0.25  # LRA's VALUE_P: a node below max_depth is an operator this often


def apply_operator(operator: str, values: list[int]) -> int:
    """The value of one operator applied to its arguments' values (digits)."""
    if operator == "[MIN":
        return min(values)
    if operator == "[MAX":
        return max(values)
    if operator == "[MED":
        return int(np.median(values))
    if operator == "[SM":
        return sum(values) % 10
    raise ValueError(f"Unknown ListOps operator {operator!r}; allowed: {OPERATORS}.")


class _TooLong(Exception):
    pass


def _draw_tree(
    rng: random.Random,
    depth: int,
    max_depth: int,
    max_args: int,
    max_length: int,
    tokens: list[str],
) -> int:
    """Appends one random subtree's tokens to `tokens`; returns its value."""
    if len(tokens) >= max_length:
        raise _TooLong  # stop early: this draw will be rejected anyway
    if depth < max_depth and rng.random() < OPERATOR_PROBABILITY:
        operator = rng.choice(OPERATORS)
        tokens.append(operator)
        values = [
            _draw_tree(rng, depth + 1, max_depth, max_args, max_length, tokens)
            for _ in range(rng.randint(2, max_args))
        ]
        tokens.append(CLOSE)
        return apply_operator(operator, values)
    digit = rng.randrange(10)
    tokens.append(str(digit))
    return digit


def draw_example(
    rng: random.Random, *, min_length: int, max_length: int, max_depth: int, max_args: int
) -> tuple[str, int]:
    """One (expression, value) with min_length < number of tokens < max_length."""
    while True:
        tokens = []
        try:
            value = _draw_tree(rng, 1, max_depth, max_args, max_length, tokens)
        except _TooLong:
            continue
        if min_length < len(tokens) < max_length:
            return " ".join(tokens), value


@dataclasses.dataclass
class ListOpsConfig(tfds.core.BuilderConfig):
    """Lengths are in tokens; depth counts the root as 1 (LRA's max_depth)."""

    min_length: int = 500
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10
    num_train: int = 96_000
    num_validation: int = 2_000
    num_test: int = 2_000
    seed: int = 0

    def validate(self):
        spec.check_int_fields(
            "listops",
            self,
            {
                "min_length": 1,
                "max_length": 1,
                "max_depth": 1,
                "max_args": 2,
                **generation.SPLIT_FIELD_MINIMUMS,
            },
        )
        if self.max_length - self.min_length < 2:
            raise ValueError(
                f"listops needs max_length >= min_length + 2 (lengths strictly between the "
                f"two), got min_length={self.min_length}, max_length={self.max_length}."
            )
        if self.max_args < 2 or self.max_depth < 1:
            raise ValueError(
                f"listops needs max_args >= 2 and max_depth >= 1, got {self.max_args}, "
                f"{self.max_depth}."
            )


class Listops(tfds.core.GeneratorBasedBuilder):
    """ListOps expressions and their values, generated from a seed."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.1.0": "Lengths exclude both bounds, as LRA's generator does.",
        "1.0.0": "Lengths included both bounds.",
    }
    BUILDER_CONFIGS = [
        ListOpsConfig(name="lra", description="As in Long Range Arena: 500-2000 tokens."),
        ListOpsConfig(
            name="small",
            min_length=100,
            max_length=500,
            num_train=20_000,
            num_validation=1_000,
            num_test=1_000,
            description="100-500 tokens, for CPU runs.",
        ),
        ListOpsConfig(
            name="tiny",
            min_length=10,
            max_length=60,
            max_depth=4,
            num_train=400,
            num_validation=100,
            num_test=100,
            description="For tests.",
        ),
    ]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "expression": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        return {split: self._generate_examples(split) for split in generation.SPLITS_IN_ORDER}

    def _generate_examples(self, split):
        c = self.builder_config
        sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        draw = lambda rng: draw_example(
            rng,
            min_length=c.min_length,
            max_length=c.max_length,
            max_depth=c.max_depth,
            max_args=c.max_args,
        )
        for index, (expression, value) in generation.split_examples(
            draw, lambda example: example[0].encode(), sizes, c.seed, split
        ):
            yield index, {"expression": expression, "label": value}


def make_encoder(builder, data_config):
    """Stored example -> {"inputs": int32 [length (+1 with [CLS])], "targets": int32 []}."""
    del builder
    prefix = [tokenizers.CLS_ID] if data_config.add_cls else []

    def encode(example):
        ids = prefix + [TOKEN_IDS[token] for token in example["expression"].decode().split()]
        return {
            "inputs": np.asarray(ids, np.int32),
            "targets": np.asarray(example["label"], np.int32),
        }

    return encode


SPEC = spec.DatasetSpec(
    builder=Listops,
    task=spec.CLASSIFICATION,
    make_encoder=make_encoder,
    vocab_size=lambda builder_config, data_config: VOCAB_SIZE,
    num_classes=lambda builder_config: NUM_CLASSES,
    max_length=lambda builder_config: builder_config.max_length + 1,  # + [CLS]
)
