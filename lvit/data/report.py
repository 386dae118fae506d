"""The `lvit data check` report: what `lvit.data.check.inspect_data` found, as text or JSON.

The summary counts records, images and problems by kind; with a recipe, it gives the sequence
lengths in tokens (percentiles and a histogram) and what the recipe's `data.max_length` /
`data.overlong` do to them. Training's "cannot train on these records" error lists problems the
same way (`format_problems`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lvit.data.records import KINDS

if TYPE_CHECKING:
    from lvit.data.check import Inspection
    from lvit.data.records import RecordError


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


def image_token_summary(per_image: list[int]) -> dict:
    """The distribution of image tokens per image (AnyRes): percentiles, how many images, the sum, a histogram."""
    return {
        **percentiles(per_image),
        "images": len(per_image),
        "total": sum(per_image),
        "histogram": histogram(per_image),
    }


def _bars(bins: list[dict]) -> list[str]:
    """A histogram's bins as text bars."""
    peak = max(b["count"] for b in bins) or 1
    return [
        f"    {b['from']:>7} - {b['to'] - 1:<7} {'#' * round(30 * b['count'] / peak):<30} {b['count']}" for b in bins
    ]


@dataclass
class CheckReport:
    inspection: Inspection
    recipe: str | None = None

    @property
    def ok(self) -> bool:
        """No error, and something to train on."""
        return not self.inspection.errors and self.inspection.trainable > 0

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
            "trainable": insp.trainable,
            "images": len(with_image),
            "unique_images": len({i for r in with_image for i in r.images}),
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
        per_image = [n for r in insp.usable for n in (r.conversation.image_tokens or ())]
        if per_image:  # LLaVA-NeXT's AnyRes: an image's tokens depend on its size
            out["image_tokens"] = image_token_summary(per_image)
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
        lines = self._summary_rows(s)
        if "image_tokens" in s:
            t = s["image_tokens"]
            counted = f"{t['images']} images, {t['total']} in all"
            lines.append(f"  image tokens per image (AnyRes: from each image's size), {counted}:")
            lines.append(f"    min {t['min']}  p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}")
            lines += _bars(t["histogram"])
        if s["overlong"] is not None:
            o = s["overlong"]
            verb = "stop training (data.overlong: error)" if o["policy"] == "error" else "be dropped"
            lines.append(
                f"  over data.max_length {o['max_length']} (data.overlong: {o['policy']}): {o['truncated']} would be "
                f"truncated after the image, {o['dropped']} would {verb}"
            )
        return lines

    def _summary_rows(self, s: dict) -> list[str]:
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
            lines += [f"    {kind:<22} {n:>7}  {KINDS.get(kind, '')}" for kind, n in s["problems_by_kind"].items()]
        if not s["decoded"]:
            lines.append(
                "  images were checked by their header only (a file cut off after it is not found); "
                "--decode decodes each one as training would"
            )
        if s["lengths"] is not None:
            ln = s["lengths"]
            n = len(self.inspection.lengths.total)
            lines.append(f"  sequence length in tokens (text + image tokens), {n} samples:")
            lines.append(f"    min {ln['min']}  p50 {ln['p50']}  p90 {ln['p90']}  p99 {ln['p99']}  max {ln['max']}")
            lines += _bars(ln["histogram"])
        elif self.recipe is None:
            lines.append("  sequence lengths: pass --recipe to measure samples in tokens (and check data.max_length)")
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
        if errors:
            lines.append(f"{errors} error(s): fix or remove these records (or train with data.on_bad_record: skip)")
        if not self.inspection.trainable:
            lines.append(nothing_to_train(self.inspection))
        elif not errors:
            lines.append("no errors")
        return "\n".join(lines)


def format_problem(p: RecordError) -> str:
    tag = p.kind if p.severity == "error" else f"{p.kind}, warning"
    return f"{p.where}: {p.reason} [{tag}]"


def nothing_to_train(insp: Inspection) -> str:
    """Why no record would train, and what would change that."""
    if not insp.total:
        return "nothing to train on: the data holds no record"
    needed = insp.max_length_needed()
    if insp.dropped and needed is not None:
        least, every = needed
        return (
            f"nothing to train on: every trainable record is too long for data.max_length {insp.max_length}; the "
            f"shortest needs data.max_length >= {least}, every record fits in {every}"
        )
    return "nothing to train on: no record is free of errors"
