"""Prints each data set's statistics: sizes, length distribution, label balance (Markdown).

    python -m transformer.data.stats                       # the default configs below
    python -m transformer.data.stats --datasets=listops:tiny,bbc_news --data_dir=/tmp/tfds

Data are prepared on first use, which for ListOps 'lra' means generating 100,000 expressions.
Lengths are in tokens after encoding, as the model sees them before padding or cutting
([CLS] and EOS included); for language modelling, the tokens of the split's packed stream.
"""

import collections

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from transformer.data import registry, spec

DEFAULT_DATASETS = (
    "listops:lra",
    "listops:small",
    "associative_recall:pairs64",
    "associative_recall:pairs512",
    "copy_reverse:copy64",
    "copy_reverse:reverse512",
    "shakespeare:plays",
    "bible_en_es:verses",
    "bbc_news:bytes",
)

_DATASETS = flags.DEFINE_list(
    "datasets", list(DEFAULT_DATASETS), "name[:config] of the data sets to describe."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's).")


def _lengths(values) -> str:
    values = np.asarray(values)
    return (
        f"{values.min()} / {int(np.median(values))} / {int(np.percentile(values, 90))} / "
        f"{values.max()}"
    )


def split_rows(data_config, data_dir=None):
    """Yields one table row (dict) per split of a data config."""
    config = registry.resolve(data_config)
    dataset = registry.get_spec(config.name)
    builder = registry.prepare(config, data_dir)
    encode = dataset.make_encoder(builder, config)
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        encoded = [encode(source[i]) for i in range(len(source))]
        row = {
            "data set": f"{config.name}:{builder.builder_config.name}",
            "split": split,
            "examples": len(source),
        }
        if dataset.task == spec.LANGUAGE_MODELLING:
            tokens = sum(len(e["tokens"]) + 1 for e in encoded)  # + EOS per document
            row["length min / median / p90 / max"] = f"{tokens:,} tokens in the stream"
            row["target length"] = ""
        else:
            row["length min / median / p90 / max"] = _lengths([len(e["inputs"]) for e in encoded])
            row["target length"] = (
                _lengths([len(e["targets"]) for e in encoded])
                if dataset.task == spec.SEQ2SEQ
                else ""
            )
        if dataset.task == spec.CLASSIFICATION:
            counts = collections.Counter(int(e["targets"]) for e in encoded)
            num_classes = dataset.num_classes(builder.builder_config)
            row["label balance"] = (
                " ".join(f"{100 * counts[c] / len(encoded):.0f}" for c in range(num_classes)) + " %"
            )
        else:
            row["label balance"] = ""
        yield row


def markdown_table(rows) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv):
    del argv
    tfds.disable_progress_bar()
    rows = []
    for entry in _DATASETS.value:
        name, _, config = entry.partition(":")
        rows += split_rows({"name": name, "config": config or None}, _DATA_DIR.value)
    print(markdown_table(rows))


if __name__ == "__main__":
    app.run(main)
