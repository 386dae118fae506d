"""Checking a dataset before training: `lvit data check`, and the same checks before every run.

`inspect_data` reads the whole dataset once (`lvit.data.records`), checks each record's image
(existence with one stat per distinct file; a full decode with `decode`), finds duplicate ids and,
given a recipe's encoder, applies the template and measures every sample in tokens, image tokens
included (one batched call of the fast tokenizer per chunk, each distinct text piece tokenized
once). `CheckReport` turns the result into the text or JSON report. Training (`lvit.data.dataset`)
runs the same `inspect_data`, so what `lvit data check --recipe` reports is what training does.
"""

from __future__ import annotations

import gc
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lvit.data.records import Record, RecordError, read_all
from lvit.errors import LvitError

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
    "multiple_images": "more than one image in a record",
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

_CHUNK = 8192  # records per batched tokenizer call


@dataclass
class Lengths:
    """Per sample: tokens in all (image tokens included), index past the image, first trained token."""

    total: list[int] = field(default_factory=list)
    image_end: list[int] = field(default_factory=list)
    first_trained: list[int] = field(default_factory=list)


@dataclass
class Inspection:
    path: str
    format: str
    total: int
    parsed: list[Record]
    """Records whose conversation is valid (images not yet checked)."""
    usable: list[Record]
    """Records that can be trained on (no error), before the over-long policy."""
    problems: list[RecordError]
    lengths: Lengths | None = None
    """For `usable`, when an encoder was given."""
    max_length: int | None = None
    overlong: str | None = None
    truncated: list[Record] = field(default_factory=list)
    dropped: list[tuple[Record, str]] = field(default_factory=list)
    decoded: bool = False

    @property
    def errors(self) -> list[RecordError]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[RecordError]:
        return [p for p in self.problems if p.severity != "error"]


def inspect_data(
    path: str | Path,
    fmt: str = "auto",
    image_folder: str | Path | None = None,
    *,
    decode: bool = False,
    encoder=None,
    max_length: int | None = None,
    overlong: str = "truncate",
) -> Inspection:
    """Read and check every record of a dataset; see the module docstring."""
    with _gc_paused():
        return _inspect(path, fmt, image_folder, decode, encoder, max_length, overlong)


@contextmanager
def _gc_paused():
    """No cyclic garbage collection while millions of acyclic objects are made (a third of the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _inspect(path, fmt, image_folder, decode, encoder, max_length, overlong) -> Inspection:
    from lvit.data.records import check_record_images

    read = read_all(Path(path), fmt)
    parsed = read.records
    usable, image_problems = check_record_images(read, image_folder, decode)
    problems = list(read.problems) + image_problems

    seen: dict[str, int] = {}
    for record in parsed:
        first = seen.setdefault(record.id, record.index)
        if first != record.index:
            problems.append(
                RecordError(
                    record.where,
                    f"id {record.id!r} is also the id of record #{first}; give every record its own id (skipped-record "
                    "files and answer files name records by id)",
                    "duplicate_id",
                    index=record.index,
                    id=record.id,
                    line=record.line,
                    severity="warning",
                )
            )

    insp = Inspection(str(path), read.format, read.total, parsed, usable, problems, decoded=decode)
    if encoder is not None:
        lengths, rejected = measure([r.conversation for r in usable], encoder)
        if rejected:  # records the template rejects (e.g. plain: one caption per record)
            for i, message in rejected.items():
                record = usable[i]
                problems.append(
                    RecordError(record.where, message, "template", index=record.index, id=record.id, line=record.line)
                )
            keep = [i for i in range(len(usable)) if i not in rejected]
            insp.usable = [usable[i] for i in keep]
            columns = (lengths.total, lengths.image_end, lengths.first_trained)
            lengths = Lengths(*([column[i] for i in keep] for column in columns))
        insp.lengths = lengths
        if max_length is not None:
            _apply_overlong(insp, max_length, overlong)
    problems.sort(key=lambda p: -1 if p.index is None else p.index)
    return insp


def _apply_overlong(insp: Inspection, max_length: int, policy: str) -> None:
    insp.max_length, insp.overlong = max_length, policy
    lengths = insp.lengths
    for i, record in enumerate(insp.usable):
        n = lengths.total[i]
        if n <= max_length:
            continue
        reason = overlong_reason(n, lengths.image_end[i], lengths.first_trained[i], max_length, policy)
        if reason is None:
            insp.truncated.append(record)
            message = f"{n} tokens (image tokens included) > data.max_length {max_length}: truncated to {max_length}"
            severity = "warning"
        else:
            insp.dropped.append((record, reason))
            if policy == "error":
                message, severity = f"{reason}; data.overlong is 'error'", "error"
            else:
                message, severity = f"dropped: {reason}", "warning"
        insp.problems.append(
            RecordError(
                record.where,
                message + " (raise data.max_length, or shorten the record)",
                "too_long",
                index=record.index,
                id=record.id,
                line=record.line,
                severity=severity,
            )
        )


def overlong_reason(n: int, image_end: int, first_trained: int, max_length: int, policy: str) -> str | None:
    """Why a sample cannot be used as is under `policy`, or None if it can (possibly truncated).

    Truncation keeps the first `max_length` tokens; it never cuts through the image tokens and must
    leave at least one trained (answer) token, else the sample is dropped.
    """
    if n <= max_length:
        return None
    if policy in ("drop", "error"):
        return f"{n} tokens (image tokens included) > data.max_length {max_length}"
    if image_end > max_length:
        return f"its image ends at token {image_end} > data.max_length {max_length}; it cannot be cut there"
    if first_trained >= max_length:
        return f"no answer token would remain within data.max_length {max_length} ({n} tokens)"
    return None


# ---------------------------------------------------------------------------------------------
# measuring samples in tokens


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Token count of each text (no special tokens), as `tokenizer(texts)` would give, batched.

    Uses the Rust tokenizer's `encode_batch_fast` (no offsets, no Python id lists) when the
    tokenizer is a fast one in its plain state; otherwise the tokenizer itself.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def measure(convs: list, encoder) -> tuple[Lengths, dict[int, str]]:
    """Exact token counts of each conversation as `encoder.encode` builds it, without building ids.

    Returns `(lengths, rejected)`: `rejected` maps the position of each conversation the template
    refuses to the reason (those have length 0 in `lengths`). The pieces come from the template
    itself; each distinct text piece is tokenized once, with the fast tokenizer, a chunk at a time,
    and the pieces of one chunk are built while the previous chunk is being tokenized (the Rust
    tokenizer runs without the GIL).
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    tokenizer = encoder.tokenizer
    bos = 0 if tokenizer.bos_token_id is None else 1
    n_image = encoder.num_image_tokens
    template = encoder.template
    out = Lengths()
    rejected: dict[int, str] = {}

    def finish(all_pieces, count) -> None:
        for pieces in all_pieces:
            pos, image_end, first = 0, 0, None
            for p in pieces:
                kind = p.kind
                n = count[p.text] if kind == "text" else n_image if kind == "image" else bos if kind == "bos" else 1
                if first is None and p.trained and n:
                    first = pos
                pos += n
                if kind == "image":
                    image_end = pos
            out.total.append(pos)
            out.image_end.append(image_end)
            out.first_trained.append(pos if first is None else first)

    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=1) as pool:
        for start in range(0, len(convs), _CHUNK):
            all_pieces = []
            for i, conv in enumerate(convs[start : start + _CHUNK], start):
                try:
                    all_pieces.append(template.pieces(conv))
                except ValueError as exc:
                    rejected[i] = str(exc)
                    all_pieces.append([])
            unique = list(dict.fromkeys(p.text for pieces in all_pieces for p in pieces if p.kind == "text"))
            pending.append((all_pieces, unique, pool.submit(token_counts, tokenizer, unique)))
            if len(pending) > 1:
                pieces, texts, future = pending.popleft()
                finish(pieces, dict(zip(texts, future.result(), strict=True)))
        while pending:
            pieces, texts, future = pending.popleft()
            finish(pieces, dict(zip(texts, future.result(), strict=True)))
    return out, rejected


def load_data_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """A recipe's `model` and `data` sections, validated as `lvit.recipe.load_recipe` validates them.

    The `training:` section is not read: validating it imports TRL (seconds), and checking data does
    not need it (`lvit finetune RECIPE --dry-run` checks it). Returns an object with `.model`,
    `.data` and `.source`, enough for `check_data` and `encoder_from_recipe`. `overrides` are
    `dotted.key=value` strings, as for `lvit finetune`.
    """
    from types import SimpleNamespace

    import yaml

    from lvit import recipe as rc
    from lvit.catalog import resolve_recipe

    path = resolve_recipe(path)
    if not path.is_file():
        raise LvitError(
            f"recipe file not found: {path}. Pass the path of a YAML recipe or the name of a shipped one "
            "(`lvit recipes ls` lists them)."
        )
    try:
        raw = getattr(rc, "_yaml", yaml.safe_load)(path.read_text())
    except yaml.YAMLError as exc:
        raise LvitError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise LvitError(f"{path}: a recipe is a YAML mapping (key: value), got {type(raw).__name__}.")
    for item in overrides:
        rc.apply_override(raw, item, str(path))
    sections = {}
    for key, cls in (("model", rc.ModelSection), ("data", rc.DataSection)):
        if key not in raw:
            raise LvitError(f"{path}: missing required key '{key}'.")
        sections[key] = rc._build(cls, raw[key], str(path), f"{key}.")
    return SimpleNamespace(**sections, source=str(path))


def encoder_from_recipe(recipe):
    """The recipe's `ConversationEncoder` from its tokenizer and the vision tower's config only (no weights)."""
    from transformers import CLIPVisionConfig

    from lvit.hub import resolve_source
    from lvit.model import load_tokenizer, num_image_tokens
    from lvit.templates import IMAGE_PLACEHOLDER, ConversationEncoder

    lm = resolve_source(recipe.model.language_model, "model.language_model", recipe.source)
    vision = resolve_source(recipe.model.vision_tower, "model.vision_tower", recipe.source)
    tokenizer = load_tokenizer(lm)
    vision_config = CLIPVisionConfig.from_pretrained(vision)
    return ConversationEncoder(
        recipe.data.template,
        tokenizer,
        tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        num_image_tokens(vision_config),
    )


# ---------------------------------------------------------------------------------------------
# the report


def percentiles(values: list[int]) -> dict:
    import numpy as np

    arr = np.asarray(values)
    p50, p90, p99 = (int(x) for x in np.percentile(arr, [50, 90, 99], method="nearest"))
    return {"min": int(arr.min()), "p50": p50, "p90": p90, "p99": p99, "max": int(arr.max())}


def histogram(values: list[int], bins: int = 10) -> list[dict]:
    """Equal-width bins from the minimum to the maximum, each `{"from", "to", "count"}` (`from` <= n < `to`)."""
    import numpy as np

    arr = np.asarray(values)
    low, top = int(arr.min()), int(arr.max()) + 1
    width = max(1, -(-(top - low) // bins))
    edges = list(range(low, low + width * bins + 1, width))
    counts, _ = np.histogram(arr, bins=edges)
    return [{"from": edges[i], "to": edges[i + 1], "count": int(c)} for i, c in enumerate(counts) if edges[i] < top]


@dataclass
class CheckReport:
    inspection: Inspection
    recipe: str | None = None

    @property
    def ok(self) -> bool:
        return not self.inspection.errors

    def summary(self) -> dict:
        insp = self.inspection
        with_image = [r for r in insp.parsed if r.image is not None]
        by_kind = Counter(p.kind for p in insp.problems)
        out = {
            "path": insp.path,
            "format": insp.format,
            "recipe": self.recipe,
            "ok": self.ok,
            "records": insp.total,
            "trainable": len(insp.usable) - (len(insp.dropped) if insp.overlong else 0),
            "images": len(with_image),
            "unique_images": len({r.image for r in with_image}),
            "text_only": len(insp.parsed) - len(with_image),
            "decoded": insp.decoded,
            "errors": len(insp.errors),
            "warnings": len(insp.warnings),
            "problems_by_kind": dict(sorted(by_kind.items())),
            "lengths": None,
            "overlong": None,
        }
        if insp.lengths is not None and insp.lengths.total:
            out["lengths"] = {**percentiles(insp.lengths.total), "histogram": histogram(insp.lengths.total)}
        if insp.overlong is not None:
            out["overlong"] = {
                "policy": insp.overlong,
                "max_length": insp.max_length,
                "truncated": len(insp.truncated),
                "dropped": len(insp.dropped),
            }
        return out

    def to_json(self) -> dict:
        return {**self.summary(), "problems": [p.to_dict() for p in self.inspection.problems]}

    def format_problems(self, problems: list[RecordError] | None = None, limit: int | None = None) -> list[str]:
        problems = self.inspection.problems if problems is None else problems
        shown = problems if limit is None else problems[:limit]
        lines = [format_problem(p) for p in shown]
        if limit is not None and len(problems) > limit:
            lines.append(f"... and {len(problems) - limit} more")
        return lines

    def format_summary(self) -> list[str]:
        s = self.summary()
        lines = [f"summary of {s['path']} (format {s['format']}):"]
        rows = [
            ("records", s["records"]),
            ("trainable", s["trainable"]),
            ("with an image", f"{s['images']} ({s['unique_images']} distinct)"),
            ("text-only", s["text_only"]),
            ("errors", s["errors"]),
            ("warnings", s["warnings"]),
        ]
        lines += [f"  {name:<14} {value}" for name, value in rows]
        if s["problems_by_kind"]:
            lines.append("  problems by kind:")
            lines += [f"    {kind:<22} {n}" for kind, n in s["problems_by_kind"].items()]
        if not s["decoded"]:
            lines.append("  images were checked for existence only; --decode decodes each one as training would")
        if s["lengths"] is not None:
            ln = s["lengths"]
            n = len(self.inspection.lengths.total)
            lines.append(f"  sequence length in tokens (text + image tokens), {n} samples:")
            lines.append(f"    min {ln['min']}  p50 {ln['p50']}  p90 {ln['p90']}  p99 {ln['p99']}  max {ln['max']}")
            peak = max(b["count"] for b in ln["histogram"]) or 1
            for b in ln["histogram"]:
                bar = "#" * round(30 * b["count"] / peak)
                lines.append(f"    {b['from']:>7} - {b['to'] - 1:<7} {bar:<30} {b['count']}")
        elif self.recipe is None:
            lines.append("  sequence lengths: pass --recipe to measure samples in tokens (and check data.max_length)")
        if s["overlong"] is not None:
            o = s["overlong"]
            verb = "stop training (data.overlong: error)" if o["policy"] == "error" else "be dropped"
            lines.append(
                f"  over data.max_length {o['max_length']} (data.overlong: {o['policy']}): {o['truncated']} would be "
                f"truncated after the image, {o['dropped']} would {verb}"
            )
        return lines

    def format_text(self) -> str:
        problems = self.inspection.problems
        lines = []
        if problems:
            lines.append(f"{len(problems)} problem(s):")
            lines += ["  " + line for line in self.format_problems()]
            lines.append("")
        lines += self.format_summary()
        errors = len(self.inspection.errors)
        lines.append(
            f"{errors} error(s): fix or remove these records (or train with data.on_bad_record: skip)"
            if errors
            else "no errors"
        )
        return "\n".join(lines)


def format_problem(p: RecordError) -> str:
    tag = p.kind if p.severity == "error" else f"{p.kind}, warning"
    return f"{p.where}: {p.reason} [{tag}]"


def check_data(
    path: str | Path | None,
    fmt: str | None = None,
    image_folder: str | Path | None = None,
    recipe=None,
    decode: bool = False,
) -> CheckReport:
    """`lvit data check`: inspect a dataset, with the recipe's template, tokenizer and limits if given.

    With a recipe, `path`, `fmt` and `image_folder` default to its `data` section.
    """
    encoder = None
    max_length, overlong = None, "truncate"
    if recipe is not None:
        data = recipe.data
        path = path if path is not None else data.path
        image_folder = image_folder if image_folder is not None else data.image_folder
        fmt = fmt or getattr(data, "format", "auto")
        encoder = encoder_from_recipe(recipe)
        max_length, overlong = data.max_length, data.overlong
    if path is None:
        raise LvitError(
            "pass the data to check (a file or dataset folder), or --recipe to check the recipe's data.path"
        )
    insp = inspect_data(
        path,
        fmt or "auto",
        image_folder,
        decode=decode,
        encoder=encoder,
        max_length=max_length,
        overlong=overlong,
    )
    return CheckReport(insp, recipe.source if recipe is not None else None)
