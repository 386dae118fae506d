"""Normalising one raw row (LLaVA's or the chat schema) into a `Record`, or a `RecordError` that says what to fix."""

from __future__ import annotations

import re

from lvit.data.records import ROLES, Record, RecordError, where_of
from lvit.data.sources import EmbeddedImage
from lvit.templates.conversation import IMAGE_PLACEHOLDER, Conversation

# ---------------------------------------------------------------------------------------------
# normalising one record


def is_image(value: object) -> bool:
    """A usable image value: a non-blank path, or an embedded image (an `EmbeddedImage` is a string too)."""
    return isinstance(value, str) and bool(value.strip())


def _rid(raw: dict, index: int) -> str:
    rid = raw.get("id")
    return str(index) if rid is None else str(rid)


class _Fail:
    """Builds a record's `RecordError`; the record's description is only formatted when one is raised."""

    __slots__ = ("raw", "index", "line")

    def __init__(self, raw: dict, index: int, line: int | None):
        self.raw, self.index, self.line = raw, index, line

    def __call__(self, kind: str, message: str) -> RecordError:
        rid = _rid(self.raw, self.index)
        where = where_of(self.index, rid, self.line)
        return RecordError(where, message, kind, index=self.index, id=rid, line=self.line)


def _not_an_object(raw: object, index: int, line: int | None) -> RecordError:
    return RecordError(
        where_of(index, None, line),
        f"a record is a JSON object, got {type(raw).__name__}",
        "not_an_object",
        index=index,
        line=line,
    )


def normalise(raw: object, index: int, line: int | None = None, require_answer: bool = True) -> Record:
    """Validate one raw LLaVA record and turn it into a `Record`, or raise `RecordError`.

    Written for speed (it runs once per record of a 600K-record file): the checks are the same
    as the error messages describe, in this order: each turn, then the turn order, then the
    placeholders.
    """
    if type(raw) is not dict:
        raise _not_an_object(raw, index, line)
    convs = raw.get("conversations")
    if type(convs) is not list or not convs:
        hint = " (this looks like a chat-format record: set the format to 'chat')" if "messages" in raw else ""
        raise _Fail(raw, index, line)(
            "no_conversation", f"'conversations' is missing or empty; add a list of {{from, value}} turns{hint}"
        )
    image = raw.get("image")
    if image is not None and (type(image) is not str or not image or image.isspace()):
        image = _check_image_field(image, _Fail(raw, index, line))  # a list, blank, or an embedded image

    turns: list[tuple[str, str]] = []
    system = None
    placeholders = 0
    roles = ROLES
    several = type(image) is list  # each image stays where its placeholder is, in any human turn
    for t, turn in enumerate(convs):
        if type(turn) is not dict:
            raise _Fail(raw, index, line)("bad_turn", f"turn {t + 1} is not an object with 'from' and 'value'")
        src = turn.get("from")
        role = roles.get(src) if type(src) is str else None
        if role is None:
            raise _Fail(raw, index, line)(
                "unknown_role", f"turn {t + 1} has unknown role {src!r}; use 'human' or 'gpt'"
            )
        value = turn.get("value")
        if not isinstance(value, str) or not value or value.isspace():
            raise _Fail(raw, index, line)(
                "empty_turn", f"turn {t + 1} ('{src}') has an empty or non-string 'value'; give it text"
            )
        if IMAGE_PLACEHOLDER in value:
            if several and role == "user":
                placeholders += value.count(IMAGE_PLACEHOLDER)
                turns.append((role, inline_placeholders(value)))
                continue
            if role == "system" or role != "user" or turns:
                if role == "system" and t != 0:
                    raise _Fail(raw, index, line)(
                        "system_not_first", f"turn {t + 1}: a system turn may only come first"
                    )
                if role == "assistant" and not turns:  # the true reason comes first
                    raise _Fail(raw, index, line)("starts_with_assistant", _starts_with_assistant(t, src, False))
                raise _Fail(raw, index, line)(
                    "placeholder_mismatch",
                    f"turn {t + 1}: '<image>' may only appear in "
                    + ("human turns" if several else "the first human turn"),
                )
            placeholders += value.count(IMAGE_PLACEHOLDER)
            value = _strip_placeholder(value)
        elif role == "system":
            if t != 0:
                raise _Fail(raw, index, line)("system_not_first", f"turn {t + 1}: a system turn may only come first")
            system = value
            continue
        if not turns and role != "user":  # before any later turn's placeholder is blamed
            raise _Fail(raw, index, line)("starts_with_assistant", _starts_with_assistant(t, src, False))
        turns.append((role, value))
    fail = _Fail(raw, index, line)
    return _finish(fail, _rid(raw, index), index, line, image, turns, system, placeholders, False, require_answer)


def _starts_with_assistant(t: int, src: str, chat: bool) -> str:
    """The message for a conversation whose first (non-system) turn, number `t` from 0, is the assistant's."""
    if chat:
        return f"the conversation must start with a user message, but message {t + 1} is the {src!r} one"
    return f"the conversation must start with a human turn, but turn {t + 1} is '{src}' (the assistant)"


def _check_image_field(image, fail):
    """The record's image: one (a path, or an embedded image), a list of two or more paths, or None."""
    if image is None:
        return None
    if isinstance(image, list) and image and all(is_image(i) for i in image):
        if any(isinstance(i, EmbeddedImage) for i in image) and len(image) > 1:
            raise fail(
                "multiple_images",
                f"the row has {len(image)} embedded images; lvit reads one image per row of a Hugging Face dataset: "
                "split it into one row per image, or save the images as files and give the record the list of "
                "their paths (LLaVA JSON or chat records)",
            )
        return list(image) if len(image) > 1 else image[0]
    if not is_image(image):
        raise fail("bad_image_field", f"'image' must be a file path, got {image!r}")
    return image


def _finish(fail, rid, index, line, image, turns, system, placeholders, chat: bool, require_answer: bool) -> Record:
    human, gpt = ("user", "assistant") if chat else ("human", "gpt")
    if not turns:
        raise fail("no_conversation", f"the conversation has no {human}/{gpt} turns")
    first = 1 if system is None else 2  # the number of the first non-system turn (a system turn comes first)
    if turns[0][0] != "user":
        raise fail("starts_with_assistant", _starts_with_assistant(first - 1, gpt, chat))
    prev = None
    for t, (role, _) in enumerate(turns):
        if role == prev:
            what = "messages" if chat else "turns"
            raise fail(
                "not_alternating",
                f"turns must alternate {human}/{gpt}, but {what} {first + t - 1} and {first + t} are both '{role}'",
            )
        prev = role
    if require_answer and turns[-1][0] != "assistant":
        raise fail(
            "ends_with_user",
            "the conversation must end with an assistant message, which is what trains; remove the last user "
            "message or add its answer"
            if chat
            else "the conversation must end with a gpt (assistant) turn, which is what trains; remove the last "
            "human turn or add its answer",
        )
    if isinstance(image, list):  # several images: one placeholder each, in the user turns
        if placeholders != len(image):
            mark = "{'type': 'image'} parts" if chat else "'<image>' placeholders"
            raise fail(
                "placeholder_mismatch",
                f"the record has {len(image)} images but {placeholders} {mark} in its "
                + ("user messages" if chat else "human turns")
                + f"; put one where each image goes, in the order of '{'images' if chat else 'image'}'",
            )
        return Record(rid, index, image, Conversation(turns=turns, has_image=True, system=system), line)
    expected = 1 if image is not None else 0
    if placeholders != expected:
        field = "images" if chat else "image"
        mark = "{'type': 'image'} part" if chat else "'<image>' placeholder"
        if image is None:
            raise fail(
                "placeholder_mismatch",
                f"'<image>' appears in the text but the record has no '{field}'; add one or remove it"
                if not chat
                else f"a {mark} appears but the record has no '{field}'; add the image or remove the part",
            )
        raise fail(
            "placeholder_mismatch",
            f"the record has an image but {placeholders} '<image>' placeholders; put exactly one "
            "at the start or end of the first human turn"
            if not chat
            else f"the record has an image but {placeholders} image parts; put exactly one {mark} in the first "
            "user message",
        )
    return Record(rid, index, image, Conversation(turns=turns, has_image=image is not None, system=system), line)


def normalise_chat(raw: object, index: int, line: int | None = None, require_answer: bool = True) -> Record:
    """Validate one chat-format record (`messages` + `images`) into a `Record`, or raise `RecordError`."""
    if not isinstance(raw, dict):
        raise RecordError(
            where_of(index, None, line),
            f"a record is a JSON object, got {type(raw).__name__}",
            "not_an_object",
            index=index,
            line=line,
        )
    rid = _rid(raw, index)
    where = where_of(index, rid, line)

    def fail(kind: str, message: str) -> RecordError:
        return RecordError(where, message, kind, index=index, id=rid, line=line)

    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        hint = " (this looks like a LLaVA-format record: set the format to 'llava')" if "conversations" in raw else ""
        raise fail("no_conversation", f"'messages' is missing or empty; add a list of {{role, content}} messages{hint}")
    images = raw.get("images", raw.get("image"))
    if images is None or images == []:
        image = None
    else:
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or not all(is_image(i) for i in images):
            raise fail("bad_image_field", f"'images' must be a list of image file paths, got {images!r}")
        image = _check_image_field(images if len(images) > 1 else images[0], fail)

    turns: list[tuple[str, str]] = []
    system = None
    placeholders = 0
    several = isinstance(image, list)  # each image stays where its part is, in any user message
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise fail("bad_turn", f"message {m + 1} is not an object with 'role' and 'content'")
        src = message.get("role")
        role = ROLES.get(src) if isinstance(src, str) else None
        if role is None:
            raise fail("unknown_role", f"message {m + 1} has unknown role {src!r}; use 'user', 'assistant' or 'system'")
        text, count = _chat_content(message.get("content"), m + 1, fail, several)
        if role == "system":
            if m != 0:
                raise fail("system_not_first", f"message {m + 1}: a system message may only come first")
            if count:
                raise fail(
                    "placeholder_mismatch", f"message {m + 1}: an image may only appear in the first user message"
                )
            system = text
            continue
        placeholders += count
        if not turns and role != "user":  # the true reason, before any placeholder is blamed
            raise fail("starts_with_assistant", _starts_with_assistant(m, src, True))
        if count and (role != "user" or (turns and not several)):
            allowed = "a user message" if several else "the first user message"
            raise fail("placeholder_mismatch", f"message {m + 1}: an image may only appear in {allowed}")
        turns.append((role, text))
    return _finish(fail, rid, index, line, image, turns, system, placeholders, True, require_answer)


def _chat_content(content, m: int, fail, inline: bool = False) -> tuple[str, int]:
    """(text, number of images) of one chat message's content; `m` is its number, from 1. With `inline` (a
    record with several images) each image stays in the text as a placeholder, in the parts' order."""
    if isinstance(content, str):
        count = content.count(IMAGE_PLACEHOLDER)
        text = (inline_placeholders(content) if inline else _strip_placeholder(content)) if count else content
        if not text.strip() and not count:
            raise fail("empty_turn", f"message {m} has empty content; give it text")
        return text, count
    if not isinstance(content, list):
        raise fail("empty_turn", f"message {m}: 'content' must be a string or a list of parts, got {content!r}")
    texts, count = [], 0
    for p, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            count += 1
            if inline:
                texts.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise fail("empty_turn", f"message {m} part {p + 1}: a text part needs a string 'text'")
            count += text.count(IMAGE_PLACEHOLDER)
            texts.append(text if inline or IMAGE_PLACEHOLDER not in text else _strip_placeholder(text))
        else:
            raise fail(
                "bad_turn",
                f"message {m} part {p + 1} is {part!r}; "
                "parts are {'type': 'text', 'text': ...} or {'type': 'image'}",
            )
    # with several images, the parts in their order (as the exported chat template renders them)
    text = inline_placeholders("".join(texts)) if inline and count else "\n".join(t for t in texts if t.strip())
    if not text.strip() and not count:
        raise fail("empty_turn", f"message {m} has no text; give it a text part")
    return text, count


def inline_placeholders(value: str) -> str:
    """A user turn of a record with several images: its placeholders kept, each followed by exactly one "\n"
    (the image renders as `<image>\n` wherever it stands, as a single image does at the start of a turn)."""
    return re.sub(re.escape(IMAGE_PLACEHOLDER) + r"\s*", IMAGE_PLACEHOLDER + "\n", value.strip())


def _strip_placeholder(value: str) -> str:
    """Remove the `<image>` placeholder and the newline that joins it to the text."""
    text = value.strip()
    if text.startswith(IMAGE_PLACEHOLDER):
        text = text[len(IMAGE_PLACEHOLDER) :]
    elif text.endswith(IMAGE_PLACEHOLDER):
        text = text[: -len(IMAGE_PLACEHOLDER)]
    else:
        text = text.replace(IMAGE_PLACEHOLDER, "")
    return text.strip()
