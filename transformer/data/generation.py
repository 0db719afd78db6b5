"""Deterministic generation of synthetic splits that share no example.

Splits are generated in the order test, validation, train from one seed, each from its own
random stream (`random.Random` seeded with a string, which hashes it with SHA-512, not with the
salted `hash`). An example equal to one already generated, in this split or an earlier one, is
drawn again. So the test set does not depend on how many training examples are asked for.
"""

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any

SPLITS_IN_ORDER = ("test", "validation", "train")
# The smallest allowed value of the split sizes and seed every generated data set's config has.
SPLIT_FIELD_MINIMUMS = {"num_train": 1, "num_validation": 1, "num_test": 1, "seed": 0}


def split_examples(
    make_example: Callable[[random.Random], Any],
    fingerprint: Callable[[Any], bytes],
    sizes: dict[str, int],
    seed: int,
    split: str,
) -> Iterator[tuple[int, Any]]:
    """Yields (index, example) for `split`; examples are distinct within and across splits.

    Args:
      make_example: draws one example from the random stream it is given.
      fingerprint: bytes that identify an example (two examples are equal iff these are).
      sizes: number of examples per split, keys 'train', 'validation', 'test'.
      seed: the data set's seed.
      split: which split to yield.
    """
    seen = set()
    for current in SPLITS_IN_ORDER:
        rng = random.Random(f"{seed}/{current}")
        count, attempts = 0, 0
        while count < sizes[current]:
            attempts += 1
            if attempts > 100 * sizes[current] + 1000:
                raise ValueError(
                    f"Could only generate {count} distinct {current} examples of {sizes[current]} "
                    f"asked for: the configuration allows too few different examples. Ask for fewer "
                    f"examples or allow longer sequences / more symbols."
                )
            example = make_example(rng)
            key = hashlib.sha256(fingerprint(example)).digest()
            if key in seen:
                continue
            seen.add(key)
            if current == split:
                yield count, example
            count += 1
        if current == split:
            return
