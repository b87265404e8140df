"""Sentence splitting: lossless, quotes, mixed Chinese/English, abbreviations, length cap."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from glm.sentences import MAX_SENTENCE_CHARS, split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # closing quotes stay with the sentence they close (blingfire cuts before them)
        ("他说：“走吧。”然后走了。", ["他说：“走吧。”", "然后走了。"]),
        ("「你好。」他说。", ["「你好。」", "他说。"]),
        ("『好！』（完）", ["『好！』", "（完）"]),
        ("He said “Hello there.” Then he left.", ["He said “Hello there.” ", "Then he left."]),
        ('She asked "why?" and left. Fine.', ['She asked "why?" and left. ', "Fine."]),
        # 。 directly followed by Latin text, and the reverse
        ("好的。Hello world. 再见。", ["好的。", "Hello world. ", "再见。"]),
        ("中文English混合没有空格。Next sentence here.", None),
        # full-width terminators blingfire misses
        ("测试；再来…完", ["测试；", "再来…", "完"]),
        ("真的吗？！是的。", ["真的吗？！", "是的。"]),
        # abbreviations are not sentence ends
        (
            "Mr. Smith met Dr. Jones at 3 p.m. today. They talked.",
            ["Mr. Smith met Dr. Jones at 3 p.m. today. ", "They talked."],
        ),
        # a line break ends a sentence; the newline stays with the sentence before it
        ("first line\nsecond line", ["first line\n", "second line"]),
        ("  leading space. Next.", ["  leading space. ", "Next."]),
        ("I like 😀 emoji. Next one 𝒜 here.", ["I like 😀 emoji. ", "Next one 𝒜 here."]),
        ("", []),
        ("   ", ["   "]),
    ],
)
def test_split_cases(text, expected):
    out = split_sentences(text)
    assert "".join(out) == text
    if expected is not None:
        assert out == expected
    else:
        assert out[0].endswith("。") and out[1] == "Next sentence here."


def test_round_trip_on_bundled_corpus(sample_corpus):
    n_sentences = 0
    for path in sample_corpus:
        for line in path.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            out = split_sentences(text)
            assert "".join(out) == text
            assert all(out), "no empty sentences"
            n_sentences += len(out)
    # Genesis alone has 1,533 verses, one a line
    assert n_sentences > 3000


def test_chinese_paragraph_without_punctuation_is_capped():
    text = "这是一段没有任何标点符号的很长的中文" * 2800  # about 50 K characters
    counts = Counter()
    out = split_sentences(text, counts=counts)
    assert "".join(out) == text
    assert max(map(len, out)) == MAX_SENTENCE_CHARS
    assert len(out) == -(-len(text) // MAX_SENTENCE_CHARS)
    assert counts["sentences_capped"] == len(out) - 1


def test_long_line_is_cut_at_whitespace():
    text = "word " * 200_000  # 1 MB, no sentence end
    out = split_sentences(text)
    assert "".join(out) == text
    assert all(len(s) <= MAX_SENTENCE_CHARS for s in out)
    # every cut lands after a space, so no word is broken
    assert all(s.endswith(" ") for s in out)


def test_custom_cap():
    out = split_sentences("a" * 100, max_chars=30)
    assert [len(s) for s in out] == [30, 30, 30, 10]
