"""Writing the run folder at the end of training, and the run files every checkpoint carries."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import TrainerCallback

from lvit.recipe.schema import Recipe
from lvit.runs.files import run_info, write_projector, write_run_files

log = logging.getLogger(__name__)


class RunFilesCallback(TrainerCallback):
    """Puts the recipe, run summary and processor into every checkpoint, so each one can be
    resumed, exported or chatted with on its own."""

    def __init__(self, recipe: Recipe, processor, segments: list[dict] | None = None):
        self.recipe = recipe
        self.processor = processor
        self.segments = segments if segments is not None else []
        self.started = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        if self.segments:  # this segment so far: a resume adds the time it kept to the whole run's
            self.segments[-1].update(to_step=state.global_step, runtime_s=round(time.monotonic() - self.started, 3))
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_run_files(folder, self.recipe, run_info(self.recipe, segments=self.segments))
                self.processor.save_pretrained(folder)


def save_run(
    trainer, recipe: Recipe, processor, metrics: dict, skipped: int = 0, segments: list | None = None, facts=None
) -> None:
    """Write the run folder: weights (stage 2) or projector (stage 1), processor, recipe, summary."""
    out = Path(trainer.args.output_dir)
    if recipe.stage == "align":
        # Only the projector trained: save just it (what stage 2's model.projector_from consumes), not a
        # copy of the frozen 13B. Gathered through accelerate so it also works under ZeRO-3/FSDP.
        state = trainer.accelerator.get_state_dict(
            trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
        )
        if trainer.args.should_save:
            prefix = "model.multi_modal_projector."
            write_projector(out, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            trainer.model.config.save_pretrained(out)
    else:
        trainer.save_model(str(out))
    if trainer.args.should_save:
        processor.save_pretrained(out)
        write_run_files(out, recipe, run_info(recipe, metrics, skipped, segments, facts))
        log.info("run saved to %s", out)
