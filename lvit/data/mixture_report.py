"""`lvit data check --recipe` on a mixture: every source checked as `lvit data check` checks one file (its own image
folder, format and template), reported source by source, then what each epoch would draw from each
(`lvit.data.mixture.plan` over the records each source keeps)."""

from __future__ import annotations

from dataclasses import dataclass

from lvit.data.check import encoder_from_recipe, inspect_data
from lvit.data.mixture import Plan, Source, plan, sources_of
from lvit.data.mixture_dataset import plan_summary
from lvit.data.report import CheckReport
from lvit.errors import LvitError


@dataclass
class MixtureReport:
    """Each source's `CheckReport`, and the mixture's `Plan` (None when a source has nothing to train on)."""

    parts: list[tuple[Source, CheckReport]]
    plan: Plan | None
    recipe: str | None = None
    plan_error: str | None = None

    @property
    def ok(self) -> bool:
        return all(report.ok for _, report in self.parts) and self.plan is not None

    def to_json(self) -> dict:
        described = {d["name"]: d for d in self.plan.describe()} if self.plan is not None else {}
        sources = []
        for source, report in self.parts:
            entry = {"name": source.name, "requested": source.amount, **report.to_json()}
            if source.name in described:
                entry.update({k: described[source.name][k] for k in ("per_epoch", "share", "repeats")})
            sources.append(entry)
        return {
            "recipe": self.recipe,
            "ok": self.ok,
            "samples_per_epoch": self.plan.samples_per_epoch if self.plan is not None else None,
            "sources": sources,
            "plan_error": self.plan_error,
        }

    def format_text(self) -> str:
        lines = []
        for source, report in self.parts:
            template = f", template {source.template}"
            lines.append(f"=== source {source.name!r}: {source.path} (requested: {source.amount}{template}) ===")
            lines.append(report.format_text())
            lines.append("")
        lines.append(plan_summary(self.plan) if self.plan is not None else f"no mixture: {self.plan_error}")
        return "\n".join(lines)


def check_mixture(recipe, decode: bool = False) -> MixtureReport:
    """Check every source of the recipe's mixture; see the module docstring."""
    data = recipe.data
    parts, encoders = [], {}
    rows, indices, totals = [], [], []
    start = 0
    for source in sources_of(data, recipe.source):
        if source.template not in encoders:
            encoders[source.template] = encoder_from_recipe(recipe, source.template)
        insp = inspect_data(
            source.path,
            source.format,
            source.image_folder,
            decode=decode,
            encoder=encoders[source.template],
            max_length=source.max_length,
            overlong=source.overlong,
        )
        parts.append((source, CheckReport(insp, recipe.source)))
        dropped = {id(r) for r, _ in insp.dropped}
        kept = [r.index for r in insp.usable if id(r) not in dropped]
        rows.append(list(range(start, start + len(kept))))
        indices.append(kept)
        totals.append(insp.total)
        start += len(kept)
    try:
        mixture = plan([s for s, _ in parts], rows, indices, totals, data.samples_per_epoch)
        error = None
    except LvitError as exc:
        mixture, error = None, str(exc)
    return MixtureReport(parts, mixture, recipe.source, error)
