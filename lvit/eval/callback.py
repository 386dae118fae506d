"""Evaluation during training: a recipe's `eval:` section.

```yaml
eval:
  data: data/heldout.json       # questions in any format lvit reads, with reference answers
                                # or several sets, e.g. one per source of a mixture: {ours: a.json, llava: b.json}
  image_folder: data/images     # default: data.image_folder
  metric: exact_match           # or scienceqa ("The answer is X." references), pope (yes/no references)
  max_new_tokens: 32
  every_n_steps: null           # also evaluate every N optimizer steps, into eval/step-N/
```

At the end of training the run folder gets `eval/results.json` and `eval/answers.jsonl` (several sets:
`eval/<name>/...`); with `every_n_steps`, `eval/step-N/` holds the same at step N. Evaluation never changes training:
generation runs without gradients in eval mode, every module's train/eval mode and every random
number generator are restored afterwards, and 4-bit layers are kept out of bitsandbytes' CPU
repacking, whose packed weights have no backward (docs/stack-notes.md#bnb-cpu-repacking).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
from transformers import TrainerCallback

from lvit.data.images import ImageLoader
from lvit.errors import LvitError
from lvit.eval.metrics import score_answers
from lvit.infer.answers import answer_row
from lvit.infer.generation import GenerationSettings, iter_answers
from lvit.infer.questions import Question, check_images, read_questions
from lvit.model.quant import disable_cpu_repacking

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


def eval_sets(recipe) -> dict[str | None, str]:
    """The recipe's evaluation sets: name -> file (one unnamed set: {None: file}); {} without eval data."""
    data = recipe.eval.data
    if data is None:
        return {}
    return dict(data) if isinstance(data, dict) else {None: data}


def check_eval_inputs(recipe) -> dict[str | None, list[Question]] | None:
    """The recipe's evaluation questions and images exist (checked before any model loads); returns the questions of
    each set (None without eval data), for `eval_callbacks`."""
    section = recipe.eval
    if section.data is None:
        return None
    if section.every_n_steps is not None and section.every_n_steps < 1:
        raise LvitError(
            f"{recipe.source}: eval.every_n_steps must be at least 1 (or null), got {section.every_n_steps}."
        )
    out = {}
    for name, path in eval_sets(recipe).items():
        key = "eval.data" if name is None else f"eval.data.{name}"
        if not Path(path).is_file():
            raise LvitError(f"{recipe.source}: {key} = {path!r}: file not found.")
        try:
            questions = read_questions(path)
            check_images(questions, eval_image_folder(recipe, name))
        except LvitError as exc:
            raise LvitError(f"{recipe.source}: {key}: {exc}") from None
        missing = [q.id for q in questions if q.reference is None]
        if missing:
            raise LvitError(
                f"{recipe.source}: {key} = {path!r}: {len(missing)} question(s) have no reference answer "
                f"(a final gpt/assistant turn) to score against, e.g. {missing[0]!r}."
            )
        out[name] = questions
    return out


def eval_image_folder(recipe, name: str | None = None):
    """Where a set's image paths resolve: `eval.image_folder`, else (a named set) the image folder of the mixture's
    source of that name, else `data.image_folder`."""
    if recipe.eval.image_folder is not None:
        return recipe.eval.image_folder
    for source in recipe.data.sources or []:
        if name is not None and (source.name or Path(source.path).stem) == name and source.image_folder is not None:
            return source.image_folder
    return recipe.data.image_folder


def eval_callbacks(
    recipe, processor, encoder, args, questions: dict[str | None, list[Question]] | None = None
) -> list[TrainerCallback]:
    """`[EvalCallback]` when the recipe has an `eval:` section with data, else `[]`; `questions`: the eval data as
    `check_eval_inputs` read it (None: read it here)."""
    if recipe.eval.data is None:
        return []
    sharded = (
        bool(args.fsdp)
        or bool(args.deepspeed)
        or any(
            os.environ.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
        )
    )
    if sharded:
        raise LvitError(
            f"{recipe.source}: eval: evaluation during training needs whole weights on one process (DDP or a single "
            "GPU), not FSDP / DeepSpeed. Remove the eval section and run `lvit generate` / `lvit eval` on the saved "
            "run."
        )
    return [EvalCallback(recipe, processor, encoder, questions)]


class EvalCallback(TrainerCallback):
    """Answers the recipe's evaluation questions with the model being trained and scores them."""

    def __init__(self, recipe, processor, encoder, questions: dict[str | None, list[Question]] | None = None):
        self.recipe = recipe
        self.section = recipe.eval
        self.files = eval_sets(recipe)
        if questions is None:
            questions = {name: read_questions(path) for name, path in self.files.items()}
        self.questions = questions
        self.encoder = encoder
        self.encoders = {name: _set_encoder(recipe, name, encoder) for name in questions}
        """Each set's encoder: the template of the mixture's source of its name, where that source has its own."""
        aspect = recipe.data.image_aspect_ratio
        self.loaders = {
            name: ImageLoader(processor.image_processor, eval_image_folder(recipe, name), aspect) for name in questions
        }
        self.settings = GenerationSettings(max_new_tokens=self.section.max_new_tokens)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.section.every_n_steps
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            self.evaluate(model, args, state, Path(args.output_dir) / EVAL_DIR / f"step-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.evaluate(model, args, state, Path(args.output_dir) / EVAL_DIR)

    def evaluate(self, model, args, state, folder: Path) -> dict | None:
        """Generate and score every set on the main process; other processes go on (DDP waits for it at the next
        step). Returns the results (several sets: by name)."""
        if not state.is_world_process_zero:
            return None
        results = {
            name: self._evaluate_set(model, args, state, folder if name is None else folder / name, name)
            for name in self.questions
        }
        return results[None] if list(results) == [None] else results

    def _evaluate_set(self, model, args, state, folder: Path, name: str | None) -> dict:

        if self.recipe.method == "qlora":
            # done at load already; generation must never repack (docs/stack-notes.md#bnb-cpu-repacking)
            disable_cpu_repacking(model)
        rng = _rng_state()
        try:
            rows = []
            questions = self.questions[name]
            batches = iter_answers(
                model,
                self.encoders[name],
                self.loaders[name],
                [q.conversation for q in questions],
                [q.image for q in questions],
                self.settings,
                self.section.batch_size,
            )
            # The model trains with fp32 masters next to 16-bit frozen weights (lvit.train.precision): generate
            # under the same autocast as the training steps.
            precision = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
            with torch.autocast(args.device.type, dtype=precision, enabled=precision is not None):
                for start, answers in batches:
                    rows += [
                        answer_row(q, a) for q, a in zip(questions[start : start + len(answers)], answers, strict=True)
                    ]
        finally:
            _restore_rng_state(rng)
        scores = score_answers(self.section.metric, rows)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        results = {"metric": self.section.metric, "step": state.global_step, "data": self.files[name], **scores}
        if name is not None:
            results["set"] = name
        (folder / "results.json").write_text(json.dumps(results, indent=2))
        log.info(
            "evaluation%s at step %d (%s on %d questions): %s; written to %s",
            "" if name is None else f" of {name!r}",
            state.global_step,
            self.section.metric,
            len(rows),
            _headline(scores),
            folder,
        )
        return results


def _set_encoder(recipe, name: str | None, encoder):
    """The encoder a named set is asked with: the same-named source's template if it sets one, else `encoder`."""
    for source in recipe.data.sources or []:
        own = source.template is not None and source.template != encoder.template.name
        if own and name is not None and (source.name or Path(source.path).stem) == name:
            return encoder.like(source.template)
    return encoder


def _headline(scores: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
