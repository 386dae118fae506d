"""Chat debris in an LLM's reply: what to cut away and keep the rest, and what makes a reply unusable.

Instruction-tuned chat models wrap what they were asked for in conversation: an opener ("Sure! Here is the
conversation:", a `### Conversation` heading), a code fence, a reasoning block (`<think>...</think>`),
markdown bold, a closing offer ("I hope this helps! Let me know if you'd like more questions."). None of it is
part of an answer a person looking at the image would give, and a model trained on it learns to say it.
What can be cut away without touching the content is cut, and named (`CLEANED` names the transformations, which
the record lists); what cannot be cut away safely refuses the reply (`Rejected`, with its reason):

- `refusal`: the model declines, or says it cannot see the image;
- `mentions_source`: an answer speaks of the captions, the boxes or their coordinates (the LLaVA paper's data
  is written as if the image were seen, Sec. 3; lvit's prompts forbid naming what was given);
- `other_language`: a reply in another script than the prompt's, or a Latin-script reply with almost none of
  English's common words when the prompt is English (Qwen-style code-switching included);
- `formatting`: a description with a list or a heading, which the detail prompt forbids.

Each function takes a text and returns the text and whether it changed; `parse` decides where each applies.
"""

from __future__ import annotations

import re
import unicodedata

CLEANED = ("think", "fence", "preamble", "epilogue", "markdown")


class Rejected(ValueError):  # noqa: N818 (a verdict on a reply, not a failure of lvit)
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_THINK = re.compile(r"\A\s*<think>.*?</think>\s*", re.DOTALL | re.IGNORECASE)
_FENCE_OPEN = re.compile(r"^[ \t]*```[\w+-]*[ \t]*$", re.MULTILINE)
_FENCE_CLOSE = re.compile(r"^[ \t]*```[ \t]*$", re.MULTILINE)
_INTERJECTION = re.compile(
    r"\A(?:great question|good question|sure|certainly|of course|absolutely|okay|alright)[!.]\s+", re.IGNORECASE
)
_OPENER_LINE = re.compile(
    r"\A(?:#{1,6}[ \t]+[^\n]+|\*\*[^*\n]{1,80}\*\*:?|(?:sure|certainly|of course|absolutely|okay|ok|alright|great)"
    r"[!.,]?(?:[ \t]+[^\n]{0,150}:)?|(?:sure|certainly|of course|absolutely)?[!.,]?[ \t]*"
    r"(?:here(?:'s| is| are)|below is|the following is)\b[^\n]{0,150}:)[ \t]*\n",
    re.IGNORECASE,
)
_CLOSING = (
    r"(?:i hope (?:this|that|these|it)|hope (?:this|that|these|it)|let me know|please let me know|feel free|"
    r"if you have any (?:other |more |further )?questions|if you need (?:any|anything|more|further|help|additional)|"
    r"if you(?:'d| would) like (?:me|more|another|additional|any)|would you like (?:me|more|another|any)|"
    r"do you want me to|shall i |is there anything else|happy to help|glad (?:i could|to) help|enjoy\b)"
)
_CLOSING_PARAGRAPH = re.compile(rf"\A[*_(\s]*(?:{_CLOSING}|note\b\s*:)", re.IGNORECASE)
_CLOSING_SENTENCE = re.compile(rf"\A[*_(\s]*{_CLOSING}", re.IGNORECASE)
_SEPARATOR_LINE = re.compile(r"^[ \t]*(?:[-=*_]{3,})[ \t]*$", re.MULTILINE)
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1", re.DOTALL)
_LIST_OR_HEADING = re.compile(r"^[ \t]*(?:[-*\u2022+][ \t]+\S|\d+[.)][ \t]+\S|#{1,6}[ \t])", re.MULTILINE)
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry,? but|i am sorry,? but|i apologi[sz]e,? but|as an ai\b|as a (?:text-based |large )?"
    r"language model|i (?:cannot|can't|can not|am unable to|'m unable to|do not have the ability to|don't have "
    r"the ability to) (?:see|view|look at|access|process|analy[sz]e|comply|fulfil)|i don'?t have (?:access to|"
    r"the ability to see|visual)|without (?:seeing|being able to see) the (?:image|picture|photo))",
    re.IGNORECASE,
)
_SOURCE = re.compile(
    r"\bcaptions?\b|\bbounding box|\bcoordinates?\b|\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+|\b(?:provided|given) "
    r"(?:description|information|context|annotations?|details|text)\b|\baccording to the (?:description|"
    r"annotations?|information|text)\b|\bthe (?:description|annotations?) (?:provided|given|says|mentions|states)",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_ENGLISH = frozenset(
    re.split(
        r"\s+",
        "the a an is are was were of in on at to and with it its this that there what which who how why where for "
        "by as be can from or has have they their he she his her you your i not",
    )
)
_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "CYRILLIC", "ARABIC", "HEBREW", "DEVANAGARI", "THAI")


def strip_think(text: str) -> tuple[str, bool]:
    """A leading reasoning block removed; one that never closes is a reply cut off in its thinking."""
    m = _THINK.match(text)
    if m:
        return text[m.end() :], True
    if text.lstrip().lower().startswith("<think>"):
        raise Rejected("truncated", "the reply is a reasoning block (<think>) that never closes")
    return text, False


def unfence(text: str) -> tuple[str, str, str, bool]:
    """(before, inside, after) a code fence around the reply's body, and whether there was one."""
    m = _FENCE_OPEN.search(text)
    if m is None:
        return "", text, "", False
    close = None
    for c in _FENCE_CLOSE.finditer(text, m.end()):
        close = c
    if close is None:  # an opening fence alone: drop the line
        return text[: m.start()], text[m.end() :], "", True
    return text[: m.start()], text[m.end() : close.start()], text[close.end() :], True


def is_preamble(text: str) -> bool:
    """Text before the first turn a careful reader drops: at most two short lines of chat."""
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) <= 2 and len(text.split()) <= 40


def strip_opener_line(text: str) -> tuple[str, bool]:
    """A description's first line when it is an opener or a heading ("Sure! Here is ...:", "## Description")."""
    m = _OPENER_LINE.match(text)
    if m and text[m.end() :].strip():
        return text[m.end() :].lstrip(), True
    return strip_interjection(text)


def strip_interjection(text: str) -> tuple[str, bool]:
    """ "Great question! ", "Sure! " at an answer's start."""
    m = _INTERJECTION.match(text)
    return (text[m.end() :], True) if m and text[m.end() :].strip() else (text, False)


def strip_epilogue(text: str) -> tuple[str, bool]:
    """Closing pleasantries and offers at the end: final paragraphs, then final sentences (never all)."""
    changed = False
    while True:
        body = _SEPARATOR_LINE.sub("", text).rstrip()
        paragraphs = re.split(r"\n[ \t]*\n", body)
        last = paragraphs[-1].strip()
        if len(paragraphs) > 1 and _CLOSING_PARAGRAPH.match(last) and len(last.split()) <= 60:
            text, changed = "\n\n".join(paragraphs[:-1]), True
            continue
        sentences = re.split(r"(?<=[.!?])\s+", last)
        if len(sentences) > 1 and _CLOSING_SENTENCE.match(sentences[-1]):
            kept = last[: last.rfind(sentences[-1])].rstrip()
            text, changed = "\n\n".join([*paragraphs[:-1], kept]), True
            continue
        return (text.strip() if changed else text), changed


def is_closing(text: str) -> bool:
    """Whether every paragraph of `text` is closing words (what may follow a fenced reply)."""
    for paragraph in re.split(r"\n[ \t]*\n", _SEPARATOR_LINE.sub("", text).strip()):
        paragraph = paragraph.strip()
        if _CLOSING_PARAGRAPH.match(paragraph) and len(paragraph.split()) <= 60:
            continue
        if paragraph and not all(_CLOSING_SENTENCE.match(s) for s in re.split(r"(?<=[.!?])\s+", paragraph)):
            return False
    return True


def strip_bold(text: str) -> tuple[str, bool]:
    """Markdown bold (`**x**`, `__x__`) kept as its words; a `**` left unpaired at either end goes too."""
    out = _BOLD.sub(r"\2", text)
    if out.count("**") % 2:
        out = out[:-2].rstrip() if out.endswith("**") else out[2:].lstrip() if out.startswith("**") else out
    return out, out != text


def check_refusal(text: str) -> None:
    m = _REFUSAL.search(text)
    if m:
        raise Rejected("refusal", f"the model declines or says it cannot see the image: {m.group(0)!r}")


def check_source(text: str) -> None:
    """Words about the given captions and boxes, or their coordinates, in what would be trained."""
    m = _SOURCE.search(text)
    if m:
        raise Rejected("mentions_source", f"the reply speaks of what it was given, not of the image: {m.group(0)!r}")


def check_language(text: str, prompt: str | None) -> None:
    """The reply in the prompt's language: no script the prompt has none of; English words if it is English."""
    if prompt is None:
        return
    extra = sorted(_scripts(text) - _scripts(prompt))
    if extra:
        raise Rejected("other_language", f"the reply holds {', '.join(extra)} text, which the prompt does not")
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) >= 12 and _english_rate(prompt) > 0.15 and _english_rate(text) < 0.06:
        raise Rejected("other_language", "the reply is not in English, the prompt's language")


def check_plain_prose(text: str) -> None:
    m = _LIST_OR_HEADING.search(text)
    if m:
        line = text[m.start() :].split("\n", 1)[0].strip()
        raise Rejected("formatting", f"a description with a list or a heading, which the prompt forbids: {line[:60]!r}")


def _scripts(text: str) -> set[str]:
    found = set()
    for ch in text:
        if ord(ch) > 0x24F and ch.isalpha():
            script = unicodedata.name(ch, "").split(" ")[0]
            if script in _SCRIPTS:
                found.add(script)
    return found


def _english_rate(text: str) -> float:
    words = [w.lower() for w in _WORD.findall(text)]
    return sum(w in _ENGLISH for w in words) / len(words) if words else 0.0
