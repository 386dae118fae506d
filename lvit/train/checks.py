"""What a recipe names that can be checked before any model loads: data files and folders, `training.report_to`."""

from __future__ import annotations

from pathlib import Path

from lvit.data.mixture import is_remote_or_glob, sources_of
from lvit.data.stream.dataset import streamed_sources
from lvit.errors import LvitError
from lvit.eval.callback import check_eval_inputs
from lvit.infer.questions import Question
from lvit.recipe.report_to import check_report_to
from lvit.recipe.schema import Recipe


def check_inputs(recipe: Recipe) -> dict[str | None, list[Question]] | None:
    """Everything that can be checked before a model loads: data files and folders, `training.report_to`. Returns
    the evaluation questions (`eval.data`, read once), or None."""
    questions = check_data_inputs(recipe)
    check_report_to(recipe)
    return questions


def check_data_inputs(recipe: Recipe) -> dict[str | None, list[Question]] | None:
    """The data files and folders a recipe names (and the eval data); returns the evaluation questions, or None."""
    data = recipe.data
    if data.path is not None and not Path(data.path).exists() and not (data.streaming and is_remote_or_glob(data.path)):
        raise LvitError(
            f"{recipe.source}: data.path = {data.path!r}: file not found. Point it at a LLaVA- or chat-format "
            f"JSON/JSONL file or a Hugging Face dataset folder (override with `data.path=...`)."
        )
    sources_of(data, recipe.source)  # a mixture's sources: their files, names and amounts
    if data.streaming:
        streamed_sources(data, recipe.source)  # the shards of each source, found and of one kind
    if data.image_folder is not None and not Path(data.image_folder).is_dir():
        raise LvitError(f"{recipe.source}: data.image_folder = {data.image_folder!r}: folder not found.")
    if recipe.model.projector_from is not None and not Path(recipe.model.projector_from).is_dir():
        raise LvitError(
            f"{recipe.source}: model.projector_from = {recipe.model.projector_from!r}: folder not found; "
            "it should be the output folder of a finished stage-1 (align) run."
        )
    return check_eval_inputs(recipe)
