"""Data configs: the registry of data sets, validation, builders and what a model needs to know.

A data config is dict-like (an `ml_collections.ConfigDict` in experiments/), for example:

    data = ml_collections.ConfigDict(dict(
        name="associative_recall",                # a TFDS builder name, one of DATASETS
        config="pairs64",                         # one of its named configs (default: the first)
        builder_overrides=dict(distance=32),      # fields of that config to change (generates anew)
        max_length=130,                           # inputs are cut to (and padded up to) this length
    ))

Fields (every other field is an error naming the allowed ones):
  name, config, builder_overrides  which data, see above.
  max_length             input length (LM: window length); default from the data set.
  max_target_length      seq2seq target length; default from the data set.
  length_buckets         ascending lengths, the last one at most max_length: each batch is padded
                         to the smallest bucket that holds its longest input (and, for seq2seq,
                         target). Default None: always pad to max_length (one shape, one compile).
  sort_window            sort this many batches' worth of examples by length before batching, so
                         that batches of similar lengths waste less padding. Default 1: no sorting.
  add_cls                classification: put [CLS] (id 3) first. Default True.
  worker_count           grain worker processes (0: read in the main process). Default 0.
  read_threads           threads of the main process that read examples ahead. Default 0: read
                         when a batch is asked for; JAX's asynchronous dispatch already overlaps
                         that with the device's step, and grain's default (16 threads filling
                         a 500-element buffer) starved small models of the CPU and slowed the
                         pattern-reach sweep several times over (CHANGELOG.md, 2026-11-22).
  plus any field a data set declares (`DatasetSpec.pipeline_fields`), e.g. bible_en_es's
  source_language ('en' or 'es') and sword_dir.
"""

import dataclasses
import re
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from transformer.data import (
    associative_recall,
    bbc_news,
    bible_en_es,
    copy_reverse,
    listops,
    shakespeare,
    spec,
)

DATASETS: dict[str, spec.DatasetSpec] = {
    "listops": listops.SPEC,
    "associative_recall": associative_recall.SPEC,
    "copy_reverse": copy_reverse.SPEC,
    "shakespeare": shakespeare.SPEC,
    "bible_en_es": bible_en_es.SPEC,
    "bbc_news": bbc_news.SPEC,
}

_COMMON_FIELDS = {
    "name": None,
    "config": None,
    "builder_overrides": {},
    "max_length": None,
    "length_buckets": None,
    "sort_window": 1,
    "worker_count": 0,
    "read_threads": 0,
}
_TASK_FIELDS = {
    spec.CLASSIFICATION: {"add_cls": True},
    spec.LANGUAGE_MODELLING: {},
    spec.SEQ2SEQ: {"max_target_length": None},
}
# Fields of tfds.core.BuilderConfig itself, which overrides may not change.
_BASE_CONFIG_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model config reads from a data config.

    Attributes:
      task: 'classification', 'language_modelling' or 'seq2seq'.
      vocab_size: number of token ids, including the reserved ones (0 pad, 1 BOS, 2 EOS, 3 CLS/UNK).
      num_classes: classification only, else None.
      max_length: length of "inputs" (the padded length when no length_buckets are set).
      max_target_length: seq2seq only: length of "targets"; else None.
    """

    task: str
    vocab_size: int
    num_classes: int | None
    max_length: int
    max_target_length: int | None
    pad_id: int = 0


def get_spec(name: str) -> spec.DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"Unknown data set name {name!r}; allowed: {sorted(DATASETS)}.")
    return DATASETS[name]


def _as_dict(data_config) -> dict[str, Any]:
    if isinstance(data_config, ml_collections.ConfigDict):
        return data_config.to_dict()
    return dict(data_config)


def builder_config(data_config) -> tfds.core.BuilderConfig:
    """The data config's named builder config, with `builder_overrides` applied and checked."""
    fields = _as_dict(data_config)
    dataset = get_spec(fields.get("name"))
    named = dataset.builder.builder_configs
    name = fields.get("config") or dataset.builder.BUILDER_CONFIGS[0].name
    if name not in named:
        raise ValueError(
            f"Unknown config {name!r} of data set {fields['name']!r}; allowed: {sorted(named)}."
        )
    config = named[name]
    overrides = dict(fields.get("builder_overrides") or {})
    if overrides:
        allowed = sorted({f.name for f in dataclasses.fields(config)} - _BASE_CONFIG_FIELDS)
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(
                f"builder_overrides {unknown} are not fields of {fields['name']}'s "
                f"config; allowed: {allowed}."
            )
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        # The name keys the prepared files on disk, so it spells out every override.
        suffix = "-".join(f"{k}={_name_part(v)}" for k, v in sorted(overrides.items()))
        config = dataclasses.replace(config, name=f"{name}-{suffix}", **overrides)
    if hasattr(config, "validate"):
        try:
            config.validate()
        except ValueError as error:
            if not overrides:
                raise
            # The check that failed may name a field the user left alone (whose allowed range
            # an override moved): say which fields were set, and where the others came from.
            set_fields = ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))
            raise ValueError(
                f"{error} (builder_overrides set {set_fields}; the other fields are those of "
                f"{fields['name']}'s config {name!r}.)"
            ) from None
    return config


def _name_part(value) -> str:
    text = "+".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return re.sub(r"[^\w.+=-]", "_", text)


def resolve(data_config) -> ml_collections.ConfigDict:
    """The data config with every field filled in (defaults), checked; raises on a wrong field."""
    fields = _as_dict(data_config)
    dataset = get_spec(fields.get("name"))
    defaults = {**_COMMON_FIELDS, **_TASK_FIELDS[dataset.task], **dataset.pipeline_fields}
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise ValueError(
            f"Unknown data config fields {unknown} for {fields['name']!r}; allowed: "
            f"{sorted(defaults)}."
        )
    resolved = {**defaults, **fields}
    for field, allowed in dataset.choices.items():
        if resolved[field] not in allowed:
            raise ValueError(
                f"data.{field}={resolved[field]!r} is not allowed; allowed: {allowed}."
            )
    config = builder_config(fields)
    if resolved["max_length"] is None:
        resolved["max_length"] = dataset.max_length(config)
    if dataset.task == spec.SEQ2SEQ and resolved["max_target_length"] is None:
        resolved["max_target_length"] = dataset.max_target_length(config)
    buckets = resolved["length_buckets"]
    if buckets is not None:
        buckets = tuple(int(b) for b in buckets)
        if list(buckets) != sorted(set(buckets)) or not buckets or buckets[0] < 1:
            raise ValueError(
                f"data.length_buckets must be ascending positive lengths, got {buckets}."
            )
        longest = max(resolved["max_length"], resolved.get("max_target_length") or 0)
        if buckets[-1] > longest:
            raise ValueError(
                f"data.length_buckets' last bucket {buckets[-1]} exceeds the longest "
                f"allowed length {longest} (max_length / max_target_length)."
            )
        resolved["length_buckets"] = buckets
    if int(resolved["sort_window"]) < 1:
        raise ValueError(f"data.sort_window must be >= 1, got {resolved['sort_window']}.")
    for field in ("worker_count", "read_threads"):
        if int(resolved[field]) < 0:
            raise ValueError(f"data.{field} must be >= 0, got {resolved[field]}.")
    return ml_collections.ConfigDict(resolved)


def data_info(data_config) -> DataInfo:
    """vocab_size, num_classes and lengths for a data config, without preparing any data."""
    resolved = resolve(data_config)
    dataset = get_spec(resolved.name)
    config = builder_config(resolved)
    is_classifier = dataset.task == spec.CLASSIFICATION
    return DataInfo(
        task=dataset.task,
        vocab_size=dataset.vocab_size(config, resolved),
        num_classes=dataset.num_classes(config) if is_classifier else None,
        max_length=resolved.max_length,
        max_target_length=resolved.get("max_target_length"),
    )


def make_builder(data_config, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a data config (not prepared). data_dir None: TFDS's default
    (~/tensorflow_datasets, or $TFDS_DATA_DIR)."""
    resolved = resolve(data_config)
    dataset = get_spec(resolved.name)
    kwargs = {"sword_dir": resolved.sword_dir} if "sword_dir" in resolved else {}
    config = builder_config(resolved)
    if config.name in dataset.builder.builder_configs:
        # A named config goes by name: TFDS rejects an equal copy of it, which is what a builder
        # pickled into a grain worker process would otherwise bring along.
        config = config.name
    return dataset.builder(config=config, data_dir=data_dir, file_format="array_record", **kwargs)


def prepare(data_config, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder, its data generated or read and written to data_dir on first use."""
    builder = make_builder(data_config, data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def with_overrides(data_config, overrides):
    """A copy of `data_config` with the (nested) fields of `overrides` replaced."""
    flat = {}

    def flatten(prefix, value):
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            for key, inner in value.items():
                flatten(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value

    flatten("", overrides)
    merged = data_config.copy_and_resolve_references()
    merged.update_from_flattened_dict(flat)
    return merged
