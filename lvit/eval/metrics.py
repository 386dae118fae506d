"""Scoring answer rows by metric name, as a recipe's `eval.metric` names it."""

from __future__ import annotations

from lvit.eval.pope import pope_metrics
from lvit.eval.scienceqa_score import score_against_references
from lvit.infer.answers import exact_match

METRICS = ("exact_match", "scienceqa", "pope")


def score_answers(metric: str, rows: list[dict]) -> dict:
    """Score answer rows that carry a `reference` with one of `METRICS`."""
    missing = [row["id"] for row in rows if row.get("reference") is None]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no reference answer to score against, e.g. {missing[0]!r}")
    if metric == "exact_match":
        return exact_match(rows)
    if metric == "scienceqa":
        return score_against_references(rows)
    if metric == "pope":
        return pope_metrics([row["answer"] for row in rows], [row["reference"] for row in rows])
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
