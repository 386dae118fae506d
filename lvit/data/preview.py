"""`lvit data preview`: the first samples of a recipe's data as the model will see them.

Each record is encoded with the recipe's template and tokenizer (`lvit.templates.encoder.ConversationEncoder`, the
same ids the collator builds, cut at `data.max_length` as it cuts them). `format_sample` shows a sample
as text with the trained spans in brackets and the image as `<image>×N`, then one row per token (index,
id, token, label; the image tokens as one row).
"""

from __future__ import annotations

from dataclasses import dataclass

from lvit.data.check import encoder_from_recipe
from lvit.data.reader import read_records
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    text: str
    """The rendered text, trained spans in [brackets], the image as `<image>×N`."""
    tokens: list[str]
    length: int
    """Tokens before the cut at data.max_length."""
    refused: str | None = None
    image_token_id: int | None = None

    def to_json(self) -> dict:
        if self.refused is not None:
            return {"id": self.id, "refused": self.refused}
        return {"id": self.id, "input_ids": self.input_ids, "labels": self.labels}


def preview(recipe, n: int = 3) -> list[Sample]:
    """The first `n` records of the recipe's data as samples (a record the template refuses is listed with why)."""

    data = recipe.data
    encoder = encoder_from_recipe(recipe)
    records, _, _ = read_records(data.path, fmt=getattr(data, "format", "auto"))
    samples = []
    for record in records[:n]:
        try:
            rendered = encoder.render(record.conversation)
            enc = encoder.encode(record.conversation)
        except ValueError as exc:
            samples.append(Sample(record.id, [], [], "", [], 0, refused=str(exc)))
            continue
        ids, labels = enc.input_ids[: data.max_length], enc.labels[: data.max_length]
        samples.append(
            Sample(
                record.id,
                ids,
                labels,
                _marked_text(rendered, encoder.num_image_tokens),
                encoder.tokenizer.convert_ids_to_tokens(ids),
                len(enc.input_ids),
                image_token_id=encoder.image_token_id,
            )
        )
    return samples


def _marked_text(rendered, n_image: int) -> str:
    marks = {}
    for start, end in rendered.trained:
        marks[start], marks[end] = "[", "]"
    text = rendered.text
    out, pos = [], 0
    for cut in sorted({*marks, *rendered.images}):
        out.append(text[pos:cut])
        if cut in marks and marks[cut] == "]":
            out.append("]")
        if cut in rendered.images:
            out.append(f"{IMAGE_PLACEHOLDER}×{n_image}")
            pos = cut + len(IMAGE_PLACEHOLDER)
        else:
            pos = cut
        if cut in marks and marks[cut] == "[":
            out.append("[")
    out.append(text[pos:])
    return "".join(out)


def format_sample(sample: Sample, max_length: int | None = None) -> str:
    """The sample as text: a header, the text with [trained spans], one row per token (image tokens: one row)."""
    if sample.refused is not None:
        return f"record {sample.id!r}: refused by the template: {sample.refused}"
    trained = sum(label != IGNORE_INDEX for label in sample.labels)
    cut = f", cut to data.max_length {max_length}" if sample.length > len(sample.input_ids) else ""
    lines = [
        f"record {sample.id!r}: {sample.length} tokens{cut}, {trained} trained",
        f"  text:  {sample.text!r}",
        "      #       id  token                 label",
    ]
    i = 0
    while i < len(sample.input_ids):
        token_id, label = sample.input_ids[i], sample.labels[i]
        j = i + 1
        if token_id == sample.image_token_id:
            while j < len(sample.input_ids) and sample.input_ids[j] == token_id:
                j += 1
        shown = repr(sample.tokens[i]) + (f"×{j - i}" if j - i > 1 else "")
        mark = "trained" if label != IGNORE_INDEX else "-"
        lines.append(f"  {i:>5} {token_id:>8}  {shown:<20}  {mark}")
        i = j
    return "\n".join(lines)
