"""`lvit data preview`: the first samples of a recipe's data as the model will see them.

Each record is encoded with the recipe's template and tokenizer (`lvit.templates.encoder.ConversationEncoder`, the
same ids the collator builds, cut at `data.max_length` as it cuts them). `format_sample` shows a sample
as text with the trained spans in brackets and each image as `<image>×N` (N: its tokens, which for LLaVA-NeXT depend
on its size), then one row per token (index,
id, token, label; the image tokens as one row).
"""

from __future__ import annotations

from dataclasses import dataclass

from lvit.data.check import check_record_images, encoder_from_recipe, image_tokens_by_size, overlong_reason
from lvit.data.mixture import is_mixture, sources_of
from lvit.data.normalise import normalise, normalise_chat
from lvit.data.reader import ReadResult, read_all
from lvit.data.stream.check import checked_samples
from lvit.data.stream.shards import list_shards
from lvit.data.stream.source_stream import Problem
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
    """Why training would leave this record out (then it is no sample)."""
    image_token_id: int | None = None
    index: int = 0
    source: str | None = None
    """The source it comes from, in a mixture."""
    image_tokens: list[int] | None = None
    """Each image's tokens, in order (LLaVA-NeXT's AnyRes: from the image's size)."""

    def to_json(self) -> dict:
        where = {} if self.source is None else {"source": self.source}
        if self.refused is not None:
            return {"id": self.id, **where, "refused": self.refused}
        images = {"image_tokens": self.image_tokens} if self.image_tokens else {}
        return {"id": self.id, **where, "input_ids": self.input_ids, "labels": self.labels, **images}


def preview(recipe, n: int = 3) -> list[Sample]:
    """The first `n` records of the recipe's data as samples, in file order (a mixture: the first `n` of each
    source, each sample naming its source). A record training would leave out is listed with why, never shown as a
    sample: an invalid record, a missing or unreadable image, a record the template refuses, one too long for
    `data.max_length` under `data.overlong`."""
    if not is_mixture(recipe.data) and not recipe.data.streaming:
        return _preview(recipe.data, encoder_from_recipe(recipe), n)
    samples, encoders = [], {}
    named = is_mixture(recipe.data)
    for source in sources_of(recipe.data, recipe.source):
        if source.template not in encoders:
            encoders[source.template] = encoder_from_recipe(recipe, source.template)
        encoder = encoders[source.template]
        shown = _streamed_preview(source, encoder, n) if recipe.data.streaming else _preview(source, encoder, n)
        for sample in shown:
            sample.source = source.name if named else None
            samples.append(sample)
    return samples


def _preview(data, encoder, n: int) -> list[Sample]:
    read = read_all(data.path, getattr(data, "format", "auto"))
    first = [r for r in read.records if r.index < n]
    head = ReadResult(read.format, first, [], read.total, {})
    records, image_problems = check_record_images(head, data.image_folder)
    image_tokens_by_size(records, encoder, data.image_folder)
    left_out = {p.index: str(p) for p in [*read.problems, *image_problems] if p.index is not None and p.index < n}
    return _samples(records, left_out, data, encoder)


def _streamed_preview(source, encoder, n: int) -> list[Sample]:
    """The first `n` samples of a streamed source, in file order (its shards sorted), checked as a streamed run
    checks them."""
    kind, shards = list_shards(source.path)
    records, left_out = [], {}
    for i, (raw, result) in enumerate(checked_samples(source, kind, shards, encoder, limit=n)):
        if isinstance(result, Problem):
            left_out[i] = f"{result.where}: {result.reason} [{result.kind}]"
            continue
        norm = normalise_chat if "messages" in raw.record else normalise
        record = norm(raw.record, raw.offset, raw.line)
        record.index = i
        records.append(record)
    image_tokens_by_size(records, encoder, source.image_folder)
    return _samples(records, left_out, source, encoder)


def _samples(records, left_out: dict, data, encoder) -> list[Sample]:
    """The records (in order) as samples, each checked against the template and `data.max_length`; `left_out`:
    place -> why (also filled here)."""
    samples = []
    for record in sorted([*records], key=lambda r: r.index):
        if record.index in left_out:
            continue
        try:
            rendered = encoder.render(record.conversation)
            enc = encoder.encode(record.conversation)
        except ValueError as exc:
            left_out[record.index] = f"{record.where}: refused by the template: {exc}"
            continue
        total = len(enc.input_ids)
        reason = overlong_reason(total, enc.image_end, enc.first_trained, data.max_length, data.overlong)
        if reason is not None:
            left_out[record.index] = f"{record.where}: too long ({reason}; data.overlong: {data.overlong})"
            continue
        ids, labels = enc.input_ids[: data.max_length], enc.labels[: data.max_length]
        counts = list(record.conversation.image_tokens or [encoder.num_image_tokens] * len(rendered.images))
        samples.append(
            Sample(
                record.id,
                ids,
                labels,
                _marked_text(rendered, counts),
                encoder.tokenizer.convert_ids_to_tokens(ids),
                total,
                image_token_id=encoder.image_token_id,
                index=record.index,
                image_tokens=counts,
            )
        )
    samples += [Sample(_id_of(why), [], [], "", [], 0, refused=why, index=i) for i, why in left_out.items()]
    return sorted(samples, key=lambda sample: sample.index)


def _id_of(why: str) -> str:
    """The record's id as a problem names it (`record #3 (id 'x')`), else its place."""
    start = why.find("(id ")
    return why[start + 5 : why.index("'", start + 5)] if start >= 0 else why.split(":", 1)[0]


def _marked_text(rendered, counts: list[int]) -> str:
    """The text, trained spans in [brackets], image k as `<image>×counts[k]`."""
    marks = {}
    by_place = dict(zip(rendered.images, counts, strict=True))
    for start, end in rendered.trained:
        marks[start], marks[end] = "[", "]"
    text = rendered.text
    out, pos = [], 0
    for cut in sorted({*marks, *rendered.images}):
        out.append(text[pos:cut])
        if cut in marks and marks[cut] == "]":
            out.append("]")
        if cut in rendered.images:
            out.append(f"{IMAGE_PLACEHOLDER}×{by_place[cut]}")
            pos = cut + len(IMAGE_PLACEHOLDER)
        else:
            pos = cut
        if cut in marks and marks[cut] == "[":
            out.append("[")
    out.append(text[pos:])
    return "".join(out)


def format_sample(sample: Sample, max_length: int | None = None) -> str:
    """The sample as text: a header, the text with [trained spans], one row per token (image tokens: one row)."""
    source = "" if sample.source is None else f"[{sample.source}] "
    if sample.refused is not None:
        return f"{source}left out of training: {sample.refused}"
    trained = sum(label != IGNORE_INDEX for label in sample.labels)
    cut = f", cut to data.max_length {max_length}" if sample.length > len(sample.input_ids) else ""
    images = f", image tokens {' + '.join(map(str, sample.image_tokens))}" if sample.image_tokens else ""
    lines = [
        f"{source}record {sample.id!r}: {sample.length} tokens{cut}, {trained} trained{images}",
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
