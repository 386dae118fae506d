"""Reading the LLM's reply into conversation turns, and refusing replies that would make bad training data.

Reply formats (the prompt files ask for them, `lvit/data/prompts/*.yaml`):

- `conversation`: turns starting with a question or answer marker at the start of a line, alternating,
  starting with a question (separator lines of "=", "-" or "*" are ignored);
- `complex`: exactly one question and one answer;
- `detail`: the description itself.

Markers are what models write for "Question:" and "Answer:": `Question:`, `Question 1:`, `Q:`, `Q1:`, `A:`,
`1. Question:`, `- Q:`, `**Question:**`, `**Question 1**:`, or a heading line `### Question 1` (any case).

Chat debris around the content is removed and named in `Parsed.cleaned` (`lvit.data.generate.hygiene`): a
reasoning block, a code fence, an opener before the first turn or the description, an interjection opening an
answer, closing pleasantries after the last answer or the description, markdown bold. A reply is rejected
(`Rejected`, with a short `reason` code and a sentence) when it was cut off at the token limit, is empty, holds
unreadable characters (control characters, U+FFFD), refuses or speaks of the captions and boxes, is in another
language than the prompt, has more than a short opener outside the turns, turns that do not alternate or are
empty, the wrong number of pairs, text left over from the prompt (the context's section headers, or markers
inside a description), or (a description) a list or a heading.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from lvit.data.generate.contexts import BOXES_HEADER, CAPTIONS_HEADER
from lvit.data.generate.hygiene import (
    Rejected,
    check_language,
    check_plain_prose,
    check_refusal,
    check_source,
    is_closing,
    is_preamble,
    strip_bold,
    strip_epilogue,
    strip_interjection,
    strip_opener_line,
    strip_think,
    unfence,
)

_LABEL = r"(?P<{}>Question|Answer|Q|A)(?:[ \t]*\d+)?"
_MARKER = re.compile(  # "Question 1:" with a list number or bold around it, or a heading line holding one
    rf"^[ \t]*(?:[-*\u2022][ \t]+)?(?:\d+[.)][ \t]*)?(?:\*\*|__)?[ \t]*{_LABEL.format('inline')}[ \t]*(?:\*\*|__)?"
    rf"[ \t]*:(?:\*\*|__)?[ \t]*|^[ \t]*(?:#{{1,6}}[ \t]*(?:\*\*)?|\*\*)[ \t]*{_LABEL.format('heading')}[ \t]*:?"
    r"[ \t]*(?:\*\*)?[ \t]*:?[ \t]*$\n?",
    re.MULTILINE | re.IGNORECASE,
)
_SEPARATOR = re.compile(r"^[ \t]*(?:={3,}|-{3,}|\*{3,})[ \t]*$", re.MULTILINE)
_LEFTOVERS = (CAPTIONS_HEADER, BOXES_HEADER.split(" (")[0] + " (name:")
MIN_DETAIL_WORDS = 8

__all__ = ["MIN_DETAIL_WORDS", "Parsed", "Rejected", "parse_reply"]


@dataclass
class Parsed:
    """A usable reply: its (question, answer) pairs (one pair with an empty question for `detail`) and the names
    of the debris removed from it (`CLEANED`), in the order they were removed."""

    pairs: list[tuple[str, str]]
    cleaned: tuple[str, ...] = ()


def _unreadable(text: str) -> str | None:
    for ch in text:
        if ch == "\ufffd":
            return "U+FFFD (undecodable bytes)"
        if ch not in "\n\t\r" and unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn"):
            return f"control or unassigned character U+{ord(ch):04X}"
    return None


class _Cleaning:
    def __init__(self):
        self.names: list[str] = []

    def note(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def apply(self, name: str, result):
        text, changed = result
        if changed:
            self.note(name)
        return text


def parse_reply(kind: str, text: str, finish_reason: str | None = None, prompt: str | None = None) -> Parsed:
    """The reply as turns, cleaned of chat debris (see the module's docstring). `prompt`, the request's text,
    lets the language be checked against it. Raises `Rejected` for a reply that must not become a record."""
    if finish_reason == "length":
        raise Rejected("truncated", "cut off at the token limit (finish_reason: length); raise --max-tokens")
    clean = _Cleaning()
    text = clean.apply("think", strip_think((text or "").strip())).strip()
    if not text:
        raise Rejected("empty", "the reply is empty")
    bad = _unreadable(text)
    if bad:
        raise Rejected("unreadable", f"the reply holds a {bad}")
    for header in _LEFTOVERS:
        if header.lower() in text.lower():
            raise Rejected("leftover_prompt", f"the reply repeats the prompt's {header!r} section")
    check_refusal(text)
    check_language(text, prompt)
    before, body, after, fenced = unfence(text)
    if fenced:
        clean.note("fence")
    if kind == "detail":
        return _detail(before, body, after, clean)
    pairs = _pairs(before, body, after, clean)
    if kind == "complex" and len(pairs) != 1:
        raise Rejected("wrong_count", f"expected one question and its answer, got {len(pairs)} pairs")
    return Parsed(pairs, tuple(clean.names))


def _outside(before: str, after: str, clean: _Cleaning) -> None:
    """Text around a fence: an opener before it is dropped, closing words after it too; anything else stays."""
    if before.strip():
        if not is_preamble(before):
            raise Rejected("text_outside_turns", f"text before the reply's body: {before.strip()[:60]!r}")
        clean.note("preamble")
    if after.strip():
        if not is_closing(after):
            raise Rejected("text_outside_turns", f"text after the reply's body: {after.strip()[:60]!r}")
        clean.note("epilogue")


def _detail(before: str, body: str, after: str, clean: _Cleaning) -> Parsed:
    _outside(before, after, clean)
    text = clean.apply("preamble", strip_opener_line(body.strip()))
    text = clean.apply("epilogue", strip_epilogue(text))
    if _MARKER.search(text):
        raise Rejected("leftover_prompt", "a description holds Question:/Answer: markers")
    check_plain_prose(text)
    text = clean.apply("markdown", strip_bold(text)).strip()
    check_source(text)
    if len(text.split()) < MIN_DETAIL_WORDS:
        raise Rejected("too_short", f"a description of fewer than {MIN_DETAIL_WORDS} words")
    return Parsed([("", text)], tuple(clean.names))


def _pairs(before: str, body: str, after: str, clean: _Cleaning) -> list[tuple[str, str]]:
    _outside(before, after, clean)
    text = _SEPARATOR.sub("", body)
    markers = list(_MARKER.finditer(text))
    if not markers:
        raise Rejected("no_turns", 'no "Question:" / "Answer:" turns in the reply')
    opener = text[: markers[0].start()].strip()
    if opener:
        if not is_preamble(opener):
            raise Rejected("text_outside_turns", f"text before the first turn: {opener[:60]!r}")
        clean.note("preamble")
    turns = []
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        role = "question" if (m.group("inline") or m.group("heading")).lower().startswith("q") else "answer"
        turns.append((role, text[m.end() : end].strip()))
    for i, (role, turn) in enumerate(turns):
        expected = "question" if i % 2 == 0 else "answer"
        if role != expected:
            raise Rejected("not_alternating", f"turn {i + 1} is {role.title()}: where {expected.title()}: was expected")
        if not turn:
            raise Rejected("empty_turn", f"turn {i + 1} ({role.title()}:) is empty")
    if len(turns) % 2:
        raise Rejected("not_alternating", "the last question has no answer")
    pairs = []
    for n in range(0, len(turns), 2):
        question = clean.apply("markdown", strip_bold(turns[n][1])).strip()
        answer = clean.apply("markdown", strip_bold(turns[n + 1][1]))
        answer = clean.apply("preamble", strip_interjection(answer.strip()))
        if n + 2 == len(turns):
            answer = clean.apply("epilogue", strip_epilogue(answer))
        for part in (question, answer):
            check_source(part)
            if not part.strip():
                raise Rejected("empty_turn", "a turn holds nothing but chat")
        pairs.append((question, answer.strip()))
    return pairs
