"""A reply corpus with its expected verdicts, and how lvit's parser does on it (`lvit.data.generate.parse`).

The corpus is a YAML list of replies, each with `kind`, `reply`, optional `finish`, `verdict` (keep, clean or
reject), and either `reason` (reject) or `turns` (the exact pairs expected) and `cleaned` (the debris removed);
the suite keeps one in `tests/fixtures/replies/corpus.yaml`. `grade` runs the parser on each entry with the
shipped prompt of its kind, and `table` sums the outcomes as the acceptance rates: replies to keep that were
kept whole, replies to clean that came out exactly clean, replies to reject that were rejected for the right
reason, and, worst of all, replies accepted with debris still in them or that should have been refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lvit.data.generate.hygiene import Rejected
from lvit.data.generate.parse import parse_reply
from lvit.data.generate.prompts import PromptSet


@dataclass
class Graded:
    name: str
    verdict: str  # what the corpus expects
    outcome: str  # "right", or what went wrong
    detail: str = ""


def prompt_text(prompts: dict[str, PromptSet], kind: str) -> str:
    """The text of a request of `kind` (system, examples and a context), for the language check."""
    return "\n".join(m["content"] for m in prompts[kind].messages("Captions:\nA scene."))


def grade(entry: dict, prompts: dict[str, PromptSet]) -> Graded:
    name, verdict = entry["name"], entry["verdict"]
    try:
        parsed = parse_reply(
            entry["kind"], entry["reply"], entry.get("finish", "stop"), prompt_text(prompts, entry["kind"])
        )
    except Rejected as exc:
        if verdict == "reject":
            right = exc.reason == entry["reason"]
            return Graded(name, verdict, "right" if right else "wrong_reason", f"{exc.reason}: {exc}")
        return Graded(name, verdict, "lost", f"{exc.reason}: {exc}")
    if verdict == "reject":
        return Graded(name, verdict, "trained_bad", f"accepted, expected {entry['reason']}")
    expected = [(t["q"], t["a"]) for t in entry["turns"]]
    if parsed.pairs != expected:
        return Graded(name, verdict, "trained_debris", f"turns differ: {parsed.pairs!r}")
    if set(parsed.cleaned) != set(entry.get("cleaned") or []):
        return Graded(name, verdict, "misnamed", f"cleaned {list(parsed.cleaned)}, expected {entry.get('cleaned')}")
    return Graded(name, verdict, "right")


def table(graded: list[Graded]) -> str:
    """The acceptance table (markdown)."""
    lines = ["| expected | replies | handled right | lost (a good reply rejected) | trained with debris | other |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for verdict in ("keep", "clean", "reject"):
        rows = [g for g in graded if g.verdict == verdict]
        counts = Counter(g.outcome for g in rows)
        debris = counts["trained_debris"] + counts["trained_bad"]
        other = len(rows) - counts["right"] - counts["lost"] - debris
        lines.append(f"| {verdict} | {len(rows)} | {counts['right']} | {counts['lost']} | {debris} | {other} |")
    return "\n".join(lines)
