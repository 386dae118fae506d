"""Records, the second step of `lvit.data`: raw rows (`lvit.data.sources`) normalised into `Record`s.

Formats (`data.format`, detected when `auto`):

- `llava`: LLaVA's format (LLaVA-CC3M-595K, LLaVA-Instruct-158K, llava_v1_5_mix665k), a JSON list or
  JSON Lines of `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`. A record
  without `image` is text-only. The `<image>` placeholder may stand at the start or at the end of
  the first human turn; it is removed here and the template puts the image back in its place.
  A record with several images (`"image": [path, ...]`, as LLaVA-OneVision's data) has one `<image>`
  per image in its human turns, in the list's order; each stays where it is (followed by "\n") and
  the image's tokens go there.
- `chat`: the Hugging Face / TRL chat convention, a JSON list or JSON Lines of
  `{"messages": [{"role": "user"|"assistant"|"system", "content": str | [{"type": "image"},
  {"type": "text", "text": ...}]}], "images": [path]}`; several images: one `{"type": "image"}` part
  (or `<image>`) per image in the user messages, in the order of `images`.
- `hf`: a Hugging Face `datasets` dataset (`save_to_disk` folder, parquet or arrow files) whose rows
  are in either schema, with images as paths or embedded (`lvit.data.sources.EmbeddedImage`).

This module holds what a record is (`Record`, `RecordError`, the problem `KINDS`); `lvit.data.normalise` turns
one raw row into one, and `lvit.data.reader` (`read_all`, `read_records`) is the one entry point that reads a
source (training, `lvit data check`, `lvit data convert`, question files): every record comes back as a `Record`
or as a `RecordError` that names it (index, id, line) and says how to fix it. Training data must end each
conversation with an answer; question files need not (`require_answer=False`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lvit.data.sources import EmbeddedImage
from lvit.templates.conversation import Conversation

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMATS = ("auto", "llava", "chat", "hf")


# Every kind of problem, with what it means. Errors keep a record out of training; warnings do not.
KINDS = {
    "invalid_json": "a JSON Lines line that is not valid JSON",
    "not_an_object": "a record that is not a JSON object",
    "no_conversation": "no conversation, or an empty one",
    "bad_turn": "a turn that is not an object, or a content part of an unknown type",
    "unknown_role": "a turn whose role is not human/gpt (user/assistant) or system",
    "empty_turn": "a turn with empty or non-string text",
    "system_not_first": "a system turn that is not the first turn",
    "starts_with_assistant": "a conversation that starts with the assistant",
    "not_alternating": "two user (or two assistant) turns in a row",
    "ends_with_user": "a conversation whose last turn is not an answer",
    "placeholder_mismatch": "image placeholders that do not match the record's images (count or place)",
    "multiple_images": "more than one image in a record where lvit takes one (a Hugging Face dataset's row)",
    "bad_image_field": "an image field that is not a path",
    "image_missing": "an image file that does not exist",
    "image_unreadable": "an image file that is not an image (or cannot be opened)",
    "image_truncated": "an image file that ends early",
    "image_corrupt": "an image file that fails to decode",
    "image_too_large": "an image too large to decode safely (decompression bomb limit)",
    "duplicate_id": "an id used by an earlier record (warning)",
    "template": "a record the recipe's template cannot take",
    "too_long": "a sample longer than data.max_length (truncated, dropped or an error, per data.overlong)",
}


class RecordError(ValueError):
    """A problem with one record; the message says what and how to fix it.

    `kind` is a stable name for the problem (see `KINDS`); `severity` is "error"
    (the record cannot be trained on) or "warning" (it can, but something is off).
    """

    def __init__(
        self,
        where: str,
        message: str,
        kind: str = "invalid",
        *,
        index: int | None = None,
        id: str | None = None,  # noqa: A002 - the record's id
        line: int | None = None,
        severity: str = "error",
    ):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.reason = message
        self.kind = kind
        self.index = index
        self.id = id
        self.line = line
        self.severity = severity

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "id": self.id,
            "line": self.line,
            "kind": self.kind,
            "severity": self.severity,
            "message": self.reason,
        }


def where_of(index: int | None, rid: str | None = None, line: int | None = None) -> str:
    """How messages name a record: `record #3 (id 'x')`, plus the line for JSON Lines files."""
    head = f"record #{index}" if index is not None else "a record"
    extra = [f"id {rid!r}"] if rid is not None else []
    if line is not None:
        extra.append(f"line {line}")
    return f"{head} ({', '.join(extra)})" if extra else head


@dataclass
class Record:
    id: str
    index: int
    image: str | EmbeddedImage | list[str] | None
    """A file path (absolute, or relative to the image folder), an image embedded in a Hugging Face dataset,
    None (text-only), or a list of two or more paths (several images, in the order of their placeholders)."""
    conversation: Conversation
    line: int | None = None

    @property
    def where(self) -> str:
        return where_of(self.index, self.id, self.line)

    @property
    def images(self) -> list:
        """The record's images, in the order their tokens take in the sample ([] for a text-only record)."""
        return [] if self.image is None else list(self.image) if isinstance(self.image, list) else [self.image]

    def to_row(self) -> dict:
        """The columns of the training dataset (`lvit.data.dataset`); `image_path` names the image (a
        path, or which image of a Hugging Face dataset it is; the first one when there are several, all of
        them in `image_paths`), which is only read when batching."""
        conv = self.conversation
        images = [str(image) for image in self.images]
        return {
            "id": self.id,
            "image_path": images[0] if images else None,
            "image_paths": images,
            "roles": [role for role, _ in conv.turns],
            "texts": [text for _, text in conv.turns],
            "system": conv.system,
        }


def conversation_from_row(row: dict) -> Conversation:
    return Conversation(
        turns=list(zip(row["roles"], row["texts"], strict=True)),
        has_image=row["image_path"] is not None,
        system=row["system"],
    )
