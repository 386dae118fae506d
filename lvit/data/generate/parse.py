"""Reading the LLM's reply into conversation turns, and refusing replies that would make bad training data.

Reply formats (the prompt files ask for them, `lvit/data/prompts/*.yaml`):

- `conversation`: turns starting with "Question:" and "Answer:" at the start of a line, alternating, starting
  with a question (separator lines of "=" or "-" are ignored);
- `complex`: exactly one "Question:" and one "Answer:";
- `detail`: the description itself.

A reply is rejected (`Rejected`, with a short `reason` code and a sentence) when it was cut off at the token
limit, is empty, holds unreadable characters (control characters, U+FFFD), has text outside the turns, turns
that do not alternate or are empty, the wrong number of pairs, or text left over from the prompt (the context's
section headers, or question/answer markers inside a description).
"""

from __future__ import annotations

import re
import unicodedata

from lvit.data.generate.contexts import BOXES_HEADER, CAPTIONS_HEADER

_MARKER = re.compile(r"^[ \t]*(?:\*\*)?(Question|Answer)(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*", re.MULTILINE | re.IGNORECASE)
_SEPARATOR = re.compile(r"^[ \t]*(?:={3,}|-{3,})[ \t]*$", re.MULTILINE)
_LEFTOVERS = (CAPTIONS_HEADER, BOXES_HEADER.split(" (")[0] + " (name:")
MIN_DETAIL_WORDS = 8


class Rejected(ValueError):  # noqa: N818 (a verdict on a reply, not a failure of lvit)
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _unreadable(text: str) -> str | None:
    for ch in text:
        if ch == "\ufffd":
            return "U+FFFD (undecodable bytes)"
        if ch not in "\n\t\r" and unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn"):
            return f"control or unassigned character U+{ord(ch):04X}"
    return None


def parse_reply(kind: str, text: str, finish_reason: str | None = None) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a reply (one pair for `detail`: question empty, filled in by the caller).

    Raises `Rejected` for a reply that must not become a record."""
    if finish_reason == "length":
        raise Rejected("truncated", "cut off at the token limit (finish_reason: length); raise --max-tokens")
    text = (text or "").strip()
    if not text:
        raise Rejected("empty", "the reply is empty")
    bad = _unreadable(text)
    if bad:
        raise Rejected("unreadable", f"the reply holds a {bad}")
    for header in _LEFTOVERS:
        if header.lower() in text.lower():
            raise Rejected("leftover_prompt", f"the reply repeats the prompt's {header!r} section")
    if kind == "detail":
        if _MARKER.search(text):
            raise Rejected("leftover_prompt", "a description holds Question:/Answer: markers")
        if len(text.split()) < MIN_DETAIL_WORDS:
            raise Rejected("too_short", f"a description of fewer than {MIN_DETAIL_WORDS} words")
        return [("", text)]
    pairs = _pairs(text)
    if kind == "complex" and len(pairs) != 1:
        raise Rejected("wrong_count", f"expected one question and its answer, got {len(pairs)} pairs")
    return pairs


def _pairs(text: str) -> list[tuple[str, str]]:
    text = _SEPARATOR.sub("", text)
    markers = list(_MARKER.finditer(text))
    if not markers:
        raise Rejected("no_turns", 'no "Question:" / "Answer:" turns in the reply')
    before = text[: markers[0].start()].strip()
    if before:
        raise Rejected("text_outside_turns", f"text before the first turn: {before[:60]!r}")
    turns = []
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        turns.append((m.group(1).lower(), text[m.end() : end].strip()))
    for i, (role, body) in enumerate(turns):
        expected = "question" if i % 2 == 0 else "answer"
        if role != expected:
            raise Rejected("not_alternating", f"turn {i + 1} is {role.title()}: where {expected.title()}: was expected")
        if not body:
            raise Rejected("empty_turn", f"turn {i + 1} ({role.title()}:) is empty")
    if len(turns) % 2:
        raise Rejected("not_alternating", "the last question has no answer")
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
