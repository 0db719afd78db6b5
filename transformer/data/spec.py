"""What the pipeline needs to know about a data set, beyond its TFDS builder."""

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

CLASSIFICATION = "classification"  # {"inputs": int32 [B, L], "targets": int32 [B]}
# {"inputs": int32 [B, L], "targets": int32 [B, L]}, and with data.pack_documents
# {"segment_ids": int32 [B, L], "positions": int32 [B, L]} too.
LANGUAGE_MODELLING = "language_modelling"
SEQ2SEQ = "seq2seq"  # {"inputs": int32 [B, Ls], "targets": int32 [B, Lt]}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One data set: its builder, its task, and how to turn a stored example into token ids.

    Attributes:
      builder: the `tfds.core.GeneratorBasedBuilder` subclass.
      task: CLASSIFICATION, LANGUAGE_MODELLING or SEQ2SEQ: the task whose batches it makes
        (`transformer.training.tasks`).
      make_encoder: (prepared builder, data_config) -> a function from a stored example (as
        `tfds.data_source` returns it: text as bytes) to a dict of int32 arrays. Classification:
        {"inputs": [L], "targets": []}; seq2seq: {"inputs": [Ls], "targets": [Lt]}; language
        modelling: {"tokens": [L]}, one document, which the pipeline packs into windows.
      vocab_size: (builder_config, data_config) -> number of token ids, padding 0 included.
      num_classes: builder_config -> number of classes (classification only).
      max_length: builder_config -> default input length (LM: window length).
      max_target_length: builder_config -> default target length (seq2seq only).
      pipeline_fields: data-config fields this data set reads, beyond the common ones, with
        their defaults.
      choices: allowed values of some of those fields.
    """

    builder: type
    task: str
    make_encoder: Callable[..., Callable[[Any], dict[str, Any]]]
    vocab_size: Callable[..., int]
    max_length: Callable[..., int]
    num_classes: Callable[..., int] | None = None
    max_target_length: Callable[..., int] | None = None
    pipeline_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    choices: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Every language-modelling data set reads the packing switch.
        if self.task == LANGUAGE_MODELLING:
            fields = {**LANGUAGE_MODELLING_FIELDS, **self.pipeline_fields}
            choices = {**LANGUAGE_MODELLING_CHOICES, **self.choices}
            object.__setattr__(self, "pipeline_fields", fields)
            object.__setattr__(self, "choices", choices)


# The data-config fields of every language-modelling data set. pack_documents: False cuts the
# split's token stream into windows that run across document boundaries; True packs documents
# into windows with segment ids and per-document positions (`pipeline.PackedWindows`).
LANGUAGE_MODELLING_FIELDS = {"pack_documents": False}
LANGUAGE_MODELLING_CHOICES = {"pack_documents": (False, True)}


def check_int_fields(dataset: str, config, minimums: dict[str, int]) -> None:
    """Raises a ValueError naming the first field of `config` that is not an int >= its minimum.

    Run before the checks that relate fields to each other, so that a bad value is blamed on
    its own field rather than on another field whose allowed range it sets.
    """
    for name, minimum in minimums.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{dataset} {name} must be an integer >= {minimum}; got {value!r}.")
