"""Reads verses from a SWORD zText Bible module (the format of Debian's `sword-text-*` packages).

A zText module stores each testament in three files:

    <testament>.bzs   block index: per block (offset, compressed size, size), 3 x uint32 LE
    <testament>.bzz   the blocks, each zlib-compressed
    <testament>.bzv   verse index: per entry (block, offset, size) as uint32, uint32, uint16 LE

The verse index has one entry per slot of the versification: entry 0 (module header), entry 1
(testament header), then for each book a book header followed, for each chapter, by a chapter
header and the chapter's verses. Verse text is OSIS XML, which `osis_to_text` strips.
"""

import html
import os
import re
import struct
import zlib

import numpy as np

from transformer.data import versification

_BLOCK = np.dtype([("offset", "<u4"), ("compressed_size", "<u4"), ("size", "<u4")])
_VERSE = struct.Struct("<IIH")

# Footnotes and their cross-references are commentary, not text of the verse.
_DROPPED_ELEMENTS = re.compile(r"<(note)\b[^>]*>.*?</note>", re.S)
# Section headings are editorial; canonical titles (Psalm superscriptions) are part of the text.
_NON_CANONICAL_TITLE = re.compile(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S)
_EMPTY_ELEMENT = re.compile(r"<[^>]*/>")  # milestones, line and paragraph markers: a space
_TAG = re.compile(r"<[^>]*>")  # word-level markup (<w>, <transChange>, ...): keep its content
_SPACES = re.compile(r"\s+")


def osis_to_text(osis: str) -> str:
    """The plain text of one verse of OSIS markup, whitespace collapsed."""
    text = _DROPPED_ELEMENTS.sub("", osis)
    text = _NON_CANONICAL_TITLE.sub("", text)
    text = _EMPTY_ELEMENT.sub(" ", text)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\u00b6", "")  # the pilcrow marks KJV paragraphs
    return _SPACES.sub(" ", text).strip()


def _read_testament(path_prefix: str) -> list[bytes]:
    """Raw OSIS bytes of every verse-index entry of one testament ('.../ot' or '.../nt')."""
    with open(path_prefix + ".bzs", "rb") as f:
        blocks = np.frombuffer(f.read(), dtype=_BLOCK)
    with open(path_prefix + ".bzz", "rb") as f:
        compressed = f.read()
    with open(path_prefix + ".bzv", "rb") as f:
        index = f.read()
    decompressed = {}
    entries = []
    for entry in range(len(index) // _VERSE.size):
        block, offset, size = _VERSE.unpack_from(index, entry * _VERSE.size)
        if size == 0:
            entries.append(b"")
            continue
        if block not in decompressed:
            start, length = int(blocks[block]["offset"]), int(blocks[block]["compressed_size"])
            decompressed[block] = zlib.decompress(compressed[start : start + length])
        entries.append(decompressed[block][offset : offset + size])
    return entries


def _verse_slots(books):
    """Yields (slot, 'Book.chapter.verse' or None for a chapter header) for one testament."""
    slot = 2  # after the module and testament headers
    for book, chapters in books:
        slot += 1  # book header
        for chapter, num_verses in enumerate(chapters, start=1):
            yield slot, f"{book}.{chapter}"
            slot += 1
            for verse in range(1, num_verses + 1):
                yield slot, f"{book}.{chapter}.{verse}"
                slot += 1


def read_module(module_dir: str) -> dict[str, str]:
    """{'Gen.1.1': 'In the beginning God created ...', ...}: every verse of a KJV-versified module.

    Args:
      module_dir: the folder holding ot.bzs/.bzv/.bzz and nt.*, e.g.
        /usr/share/sword/modules/texts/ztext/engKJV2006eb.

    Verses the module leaves empty map to ''. Raises ValueError if the module's own chapter markers
    disagree with the KJV versification (a module with another versification).
    """
    verses = {}
    for testament, books in (("ot", versification.OT_BOOKS), ("nt", versification.NT_BOOKS)):
        entries = _read_testament(os.path.join(module_dir, testament))
        for slot, reference in _verse_slots(books):
            if slot >= len(entries):
                raise ValueError(
                    f"{module_dir}/{testament}.bzv has {len(entries)} entries; the KJV "
                    f"versification needs more (at {reference}). Not a KJV-versified module."
                )
            osis = entries[slot].decode("utf-8")
            if reference.count(".") == 1:  # chapter header
                if osis and f'osisID="{reference}"' not in osis:
                    raise ValueError(
                        f"{module_dir}: chapter marker {osis[:80]!r} found where the KJV "
                        f"versification puts {reference}."
                    )
            else:
                verses[reference] = osis_to_text(osis)
    return verses
