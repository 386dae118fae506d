"""Answer files: `lvit generate`'s resumable JSONL of answers, one row per question.

Each line: `{"id", "prompt", "answer", "reference"?, "image"?}`. Lines are appended and flushed
batch by batch, so an interrupted run resumes where it stopped: ids already answered are skipped,
and a cut-off last line is answered again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lvit.errors import Interrupted, LvitError
from lvit.infer.generation import GenerationSettings, iter_answers
from lvit.infer.load import LoadedModel, load_model
from lvit.infer.questions import Question, check_images, read_questions
from lvit.llm.jsonl_log import read_rows

log = logging.getLogger(__name__)


@dataclass
class AnswerFile:
    """An answer file after answering: its path, the questions asked and every row in it by id."""

    path: Path
    questions: list[Question]
    rows: dict[str, dict]

    @property
    def answered(self) -> list[dict]:
        """The rows of the questions asked, in question order."""
        return [self.rows[q.id] for q in self.questions if q.id in self.rows]

    def exact_match(self) -> dict | None:
        """`exact_match` over the answers that have a reference, or None when none has."""
        scored = [row for row in self.answered if row.get("reference") is not None]
        return exact_match(scored) if scored else None


def answer_question_file(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    image_folder: str | Path | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    load_4bit: bool = False,
    device: str | None = None,
    progress: bool = True,
    base_model: dict[str, str] | None = None,
) -> AnswerFile:
    """`lvit generate`: answer the question file `data` with the model folder `model` into `out`.

    Everything that can fail without the model (the settings, the questions, their images, the
    answer file) is checked before it loads; it loads only when something is left to answer.
    """
    settings = settings or GenerationSettings()
    settings.kwargs()  # check the values before anything is read
    if batch_size < 1:
        raise LvitError(f"--batch-size must be at least 1, got {batch_size}")
    questions = read_questions(data)
    return answer_questions(
        model,
        questions,
        out,
        image_folder,
        settings,
        batch_size,
        load_4bit=load_4bit,
        device=device,
        progress=progress,
        base_model=base_model,
    )


def answer_questions(
    model: str | Path,
    questions: list[Question],
    out: str | Path,
    image_folder: str | Path | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    load_4bit: bool = False,
    device: str | None = None,
    progress: bool = True,
    base_model: dict[str, str] | None = None,
) -> AnswerFile:
    """Answer `questions` with the model folder `model` (any folder `lvit.infer.load.load_model` loads) into
    the answer file `out`, resuming it; every image is checked before the model loads."""
    check_images(questions, image_folder)
    rows = generate_file(
        lambda: load_model(model, load_4bit=load_4bit, device=device, base_model=base_model),
        questions,
        out,
        image_folder,
        settings,
        batch_size,
        progress,
    )
    return AnswerFile(Path(out), questions, rows)


def read_answer_file(path: str | Path, repair: bool = False) -> dict[str, dict]:
    """Rows of a JSONL answer file by id. A cut-off last line (an interrupted run) is tolerated and,
    with `repair`, removed from the file; a bad line anywhere else is an error."""
    return read_rows(path, repair=repair, what="JSON answer row")


def generate_file(
    loaded: LoadedModel | Callable[[], LoadedModel],
    questions: list[Question],
    out: str | Path,
    image_folder: str | Path | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, dict]:
    """Answer `questions` into the JSONL file `out`, skipping ids already answered there.

    `loaded` may be a function that loads the model, called only when something is left to answer.
    Returns all rows by id.
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    out = Path(out)
    done = read_answer_file(out, repair=True)
    todo = [q for q in questions if q.id not in done]
    stale = [q.id for q in questions if q.id in done and done[q.id].get("prompt", q.prompt) != q.prompt]
    if stale:
        raise LvitError(
            f"{out} already answers {len(stale)} of these ids for a different question (e.g. {stale[0]!r}); "
            "write to another file, or remove it to start over."
        )
    if len(todo) < len(questions):
        log.info(
            "%s: %d of %d questions already answered; answering the rest",
            out,
            len(questions) - len(todo),
            len(questions),
        )
    check_images(todo, image_folder)
    if not todo:
        return done
    if not isinstance(loaded, LoadedModel):
        loaded = loaded()
    loader = loaded.image_loader(image_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with out.open("ab") as f:
            f.write(b"\n")
    encoder = loaded.encoder()
    bar = tqdm(total=len(todo), desc="generating", unit="q", disable=not progress, file=sys.stderr)
    try:
        with out.open("a", encoding="utf-8") as f:
            batches = iter_answers(
                loaded.model,
                encoder,
                loader,
                [q.conversation for q in todo],
                [q.image for q in todo],
                settings,
                batch_size,
            )
            for start, answers in batches:
                for q, answer in zip(todo[start : start + len(answers)], answers, strict=True):
                    row = answer_row(q, answer)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[q.id] = row
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(answers))
    except KeyboardInterrupt:  # every finished batch is in the file already
        bar.close()
        kept = sum(q.id in done for q in questions)
        raise Interrupted(
            f"{out} keeps {kept} of {len(questions)} answers ({kept - len(questions) + len(todo)} from this run); "
            "run the same command again to answer the rest (answered questions are skipped)."
        ) from None
    bar.close()
    return done


def answer_row(question: Question, answer: str) -> dict:
    row = {"id": question.id, "prompt": question.prompt, "answer": answer}
    if question.reference is not None:
        row["reference"] = question.reference
    if question.image is not None:
        row["image"] = question.image
    return row


def exact_match(rows: list[dict]) -> dict:
    """Share of answers equal to their reference, ignoring case and surrounding whitespace."""
    hits = [row["answer"].strip().lower() == row["reference"].strip().lower() for row in rows]
    return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "correct": sum(hits), "total": len(hits)}
