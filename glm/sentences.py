"""Lossless sentence splitting for English, Chinese and mixed text.

blingfire finds the sentence ends (it knows English abbreviations such as "Mr." and "e.g.");
this module turns its answer into cut positions in the original string and fixes what it
gets wrong for this corpus:

- it cuts *before* a closing quote or bracket (``他说：“走吧。|”``) and inside runs of marks
  (``？|！``); the closer belongs to the sentence it closes, so such a cut moves past it;
- it cuts after a quoted question inside a sentence (``"why?" | and``); a cut before a
  lowercase Latin letter is dropped;
- it does not cut after ``；`` or ``…``, nor after ``。`` directly followed by Latin text;
  every run of CJK sentence-final punctuation (plus closers) ends a sentence here;
- it treats a line break as a space; here a line break always ends a sentence (the corpora
  are line-structured: verses, poem lines, sayings);
- it never caps length; here no sentence is longer than ``MAX_SENTENCE_CHARS``: a longer
  one is cut at the last whitespace before the cap, or hard at the cap when there is none
  (a paragraph of Chinese without punctuation, a 10 MB line).

Whitespace between two sentences stays at the end of the first one, so
``"".join(split_sentences(text)) == text`` always holds.
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter

import numpy as np
from blingfire import blingfire as _bf_lib

# 1024 characters is at most 4 KiB of UTF-8, inside sentencepiece's default
# max_sentence_length, so no sentence is ever dropped by tokenizer training.
MAX_SENTENCE_CHARS = 1024

CLOSERS = "”’\"'」』）)》〉】］]"
_TRAILING = frozenset(CLOSERS + "。！？；…!?")
_CJK_END = re.compile(r"[。！？；…]+[" + re.escape(CLOSERS) + r"]*")
_LINE_END = re.compile(r"\n+")


def _skip_closers(text: str, pos: int) -> int:
    """Move ``pos`` past closing quotes/brackets and sentence-final marks (``？|！``, ``。|”``)
    and the whitespace after them."""
    n = len(text)
    moved = False
    while pos < n and text[pos] in _TRAILING:
        pos += 1
        moved = True
    if moved:
        while pos < n and text[pos].isspace():
            pos += 1
    return pos


def _cap(piece: str, limit: int) -> list[str]:
    """Cut ``piece`` into parts of at most ``limit`` chars, preferring whitespace."""
    parts = []
    start, n = 0, len(piece)
    while n - start > limit:
        end = start + limit
        # cut after the last whitespace in the second half of the window, if there is one
        ws = max(piece.rfind(" ", start, end), piece.rfind("\t", start, end))
        ws = max(ws, piece.rfind("\u3000", start, end))
        cut = ws + 1 if ws >= start + limit // 2 else end
        parts.append(piece[start:cut])
        start = cut
    parts.append(piece[start:])
    return parts


def _blingfire_starts(text: str) -> list[int]:
    """Character offsets where blingfire starts a sentence (after the first one).

    Calls the C library directly: blingfire's Python wrapper maps byte offsets to character
    offsets with a per-byte Python loop, which made it 80% of the split stage's time.
    """
    data = text.encode("utf-8")
    n = len(data)
    # the same buffer sizes as blingfire's own wrapper; np.empty pages stay untouched
    capacity = 2 * n + 16
    out = np.empty(capacity, dtype=np.uint8)
    starts = np.empty(capacity, dtype=np.int32)
    ends = np.empty(capacity, dtype=np.int32)
    int_ptr = ctypes.POINTER(ctypes.c_int32)
    o_len = _bf_lib.TextToSentencesWithOffsets(
        ctypes.c_char_p(data),
        ctypes.c_int(n),
        out.ctypes.data_as(ctypes.c_char_p),
        starts.ctypes.data_as(int_ptr),
        ends.ctypes.data_as(int_ptr),
        ctypes.c_int(capacity),
    )
    if o_len <= 0 or o_len > capacity:
        return []
    count = int(np.count_nonzero(out[:o_len] == ord("\n"))) + 1
    byte_starts = starts[1:count]
    if n == len(text):
        return byte_starts.tolist()
    # byte offset -> character offset: count the non-continuation bytes before it
    lead = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80
    char_index = np.cumsum(lead, dtype=np.int64) - 1
    return char_index[byte_starts].tolist()


def sentence_cuts(text: str) -> list[int]:
    """Sorted positions strictly inside ``text`` where a new sentence starts."""
    n = len(text)
    cuts: set[int] = set()
    if not text.strip():
        return []
    for start in _blingfire_starts(text):
        pos = _skip_closers(text, start)
        # a sentence does not start with a lowercase Latin letter: '"why?" and left' is one
        if pos < n and not ("a" <= text[pos] <= "z"):
            cuts.add(pos)
    for m in _CJK_END.finditer(text):
        pos = m.end()
        while pos < n and text[pos].isspace():
            pos += 1
        cuts.add(pos)
    for m in _LINE_END.finditer(text):
        pos = m.end()
        while pos < n and text[pos].isspace():
            pos += 1
        cuts.add(pos)
    return sorted(c for c in cuts if 0 < c < n)


def split_sentences(
    text: str, max_chars: int = MAX_SENTENCE_CHARS, counts: Counter | None = None
) -> list[str]:
    """Split ``text`` into sentences; ``"".join(result) == text``, no part over ``max_chars``.

    Leading whitespace stays with the first sentence and whitespace between sentences with
    the one before it. An empty string gives an empty list. ``counts["sentences_capped"]``
    (when given) grows by the number of extra cuts the length cap made.
    """
    if not text:
        return []
    out: list[str] = []
    prev = 0
    for cut in [*sentence_cuts(text), len(text)]:
        piece = text[prev:cut]
        prev = cut
        if len(piece) > max_chars:
            parts = _cap(piece, max_chars)
            out.extend(parts)
            if counts is not None:
                counts["sentences_capped"] += len(parts) - 1
        elif piece:
            out.append(piece)
    return out
