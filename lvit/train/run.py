"""One training run: recipe -> model, data and `SFTTrainer` -> a saved run folder.

Read top to bottom: `TrainingRun.setup()` checks the recipe's inputs, builds the `SFTConfig`, assembles
the model, freezes it for its stage, prepares the data and builds the trainer; `train()` trains through
TRL; `save()` writes the run folder. `run(recipe)` does all three.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from lvit.console import quiet_libraries, show_progress_bar
from lvit.data.collator import LlavaCollator
from lvit.data.dataset import Prepared, tidy_skipped, write_skipped
from lvit.data.images import ImageLoader
from lvit.data.mixture import sources_of
from lvit.data.mixture_dataset import plan_summary, write_plan
from lvit.data.mixture_sampler import RECORD_FOLDER
from lvit.data.shared import prepare_once
from lvit.data.stream.dataset import StreamedData, check_readers, streamed_sources
from lvit.errors import BAD_RECORD_FIXES, BadRecordStop, LvitError, UnreadableRecord
from lvit.eval.callback import eval_callbacks
from lvit.model.encoder import conversation_encoder
from lvit.model.next import newline_of
from lvit.model.stages import format_report, report_modules
from lvit.recipe.schema import Recipe
from lvit.runs.files import LOG_FILE, SKIPPED_FILE
from lvit.runs.resume import resume_checkpoint, set_aside_incomplete
from lvit.train import history
from lvit.train.build import build_model, packing_options
from lvit.train.checks import check_inputs
from lvit.train.config import build_sft_config
from lvit.train.preemption import GracefulStop, Preempted
from lvit.train.save import RunFilesCallback, save_run
from lvit.train.segments import check_resume, earlier_segments, whole_run_metrics
from lvit.train.summary import summarize
from lvit.train.trainer import LlavaTrainer

log = logging.getLogger(__name__)


class TrainingRun:
    """One run, in the order it happens; each step is a method, so a test (or a tool) can look between them.

    - `setup()`: checks the recipe's inputs, decides about the output folder (start, or resume from its
      newest complete checkpoint), assembles the model and freezes it for its stage, prepares the data
      (the checks of `lvit data check`) and builds the trainer;
    - `train()`: the optimizer steps, through TRL (stops cleanly on SIGTERM / Ctrl-C);
    - `save()`: writes the run folder (`lvit.runs`) and returns it.

    `run(recipe)` does all three.
    """

    def __init__(
        self,
        recipe: Recipe,
        resume: bool | None = None,
        allow_changed: tuple[str, ...] = (),
        command: str | None = None,
    ):
        self.recipe = recipe
        self.command = command if command is not None else shlex.join(sys.argv)  # what lvit_run.json records
        self.resume = resume
        self.allow_changed = tuple(allow_changed)
        self.trainer: LlavaTrainer | None = None
        self.out: Path | None = None
        self.resume_from: Path | None = None

    def setup(self) -> TrainingRun:

        recipe = self.recipe
        quiet_libraries()
        eval_questions = check_inputs(recipe)
        args = build_sft_config(recipe)
        if recipe.data.streaming:  # every reader its own shards, before any model loads
            self.shards = streamed_sources(recipe.data, recipe.source)
            check_readers(self.shards, args.world_size, args.dataloader_num_workers, recipe.source)
        self.main = main = args.process_index == 0
        _setup_logging(main)
        self.out = out = Path(args.output_dir)
        if main:
            set_aside_incomplete(out)
        args.distributed_state.wait_for_everyone()
        self.resume_from = resume_checkpoint(out, self.resume, recipe.source)
        args.distributed_state.wait_for_everyone()  # every rank decided before rank 0 writes anything
        if self.resume_from is not None:
            log.info("resuming from %s", self.resume_from)
            # before any model loads: a resume trains on with the settings it trained with (lvit.train.segments)
            segment = check_resume(recipe, self.resume_from, self.allow_changed)
            self.segments = [*earlier_segments(self.resume_from), segment]
        else:
            self.segments = [{"from_step": 0, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changed": {}}]

        model, processor = build_model(recipe, args)
        if main:
            llava = model.get_base_model() if recipe.method != "full" else model
            log.info(
                "stage %s, method %s: what trains and what is frozen\n%s",
                recipe.stage,
                recipe.method,
                format_report(report_modules(llava)),
            )

        tokenizer = processor.tokenizer
        encoder = conversation_encoder(recipe.data.template, tokenizer, model.config)
        sources = sources_of(recipe.data, recipe.source)
        encoders = {recipe.data.template: encoder}
        for template in {s.template for s in sources} - set(encoders):
            encoders[template] = conversation_encoder(template, tokenizer, model.config)
        self.skipped_file = out / SKIPPED_FILE
        if recipe.data.streaming:
            dataset, mixture = self._streamed_data(encoders, args), None
            names = dataset.names if dataset.mixture else None
        else:
            dataset, mixture = self._prepared_data(encoders, args), self.prepared.plan
            names = [s.name for s in mixture.sources] if mixture is not None else None
        aspect = recipe.data.image_aspect_ratio
        by_source = None
        if names is not None:
            by_source = [
                (encoders[s.template], ImageLoader(processor.image_processor, s.image_folder, aspect), skips)
                for s in sources
                for skips in [s.on_bad_record == "skip"]
            ]
        skip = recipe.data.on_bad_record == "skip" or any(s.on_bad_record == "skip" for s in sources)
        collator = LlavaCollator(
            encoder,
            ImageLoader(processor.image_processor, recipe.data.image_folder, aspect),
            tokenizer.pad_token_id,
            recipe.data.max_length,
            skipped_file=self.skipped_file if skip else None,
            **packing_options(recipe, model),
            by_source=by_source,
            source_names=names,
        )
        self.processor = processor
        self.stop = GracefulStop()
        self.trainer = trainer = LlavaTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=processor,
            mixture=mixture,
            record_mixture_to=out / RECORD_FOLDER if mixture is not None else None,
            source_names=names,
            streamed=recipe.data.streaming,
            callbacks=[
                RunFilesCallback(recipe, processor, self.segments),
                self.stop,
                *eval_callbacks(recipe, processor, encoder, args, eval_questions),
            ],
        )
        if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
            trainer.accelerator.state.fsdp_plugin.state_dict_type
        ):
            raise LvitError(
                "FSDP with a sharded state dict: the Trainer would save no model weights. Set fsdp_state_dict_type: "
                "FULL_STATE_DICT in the accelerate config (see recipes/accelerate/fsdp_8gpu.yaml)."
            )
        if (
            newline_of(trainer.model) is not None
            and recipe.method != "full"
            and (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)
        ):
            raise LvitError(
                "a LoRA / QLoRA LLaVA-NeXT run under DeepSpeed or FSDP: lvit keeps its image_newline beside the "
                "adapter from the whole parameter, which these shard. Launch with plain data parallelism instead "
                "(`accelerate launch --multi_gpu --num_processes N -m lvit finetune ...`; the adapters are small), or "
                "use method: full."
            )
        self.history = history.install(trainer, out / LOG_FILE, show_progress_bar(recipe, args))
        trainer.resume_data_from = self.resume_from
        return self

    def _prepared_data(self, encoders: dict, args):
        """The in-memory training dataset: every record read and checked up front, on rank 0 only (every rank trains on
        the records rank 0 kept); a mixture's plan logged and written to the run folder."""
        recipe, out = self.recipe, self.out
        self.prepared = prepared = prepare_once(recipe.data, encoders, recipe.source)
        mixture = prepared.plan
        if mixture is not None and self.main:
            log.info("%s", plan_summary(mixture))
            write_plan(mixture, out, args.data_seed or args.seed)
        dataset = prepared.dataset
        if prepared.skipped:
            if self.main:
                write_skipped(prepared.skipped, self.skipped_file, append=self.resume_from is not None)
            log.warning(
                "%d of %d record(s) left out of training (%d invalid, skipped under data.on_bad_record=skip; %d too "
                "long for data.max_length=%d); each is listed with its reason in %s",
                len(prepared.skipped),
                prepared.total,
                len(prepared.skipped) - len(prepared.dropped),
                len(prepared.dropped),
                recipe.data.max_length,
                self.skipped_file,
            )
        log.info(
            "training on %d records (%d with images); global batch %d = %d per device x %d accumulation x %d "
            "process(es)%s",
            len(dataset),
            sum(p is not None for p in dataset["image_path"]),
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            args.world_size,
            " (per device: replaced by data.max_tokens_per_batch)" if recipe.data.max_tokens_per_batch else "",
        )
        return dataset

    def _streamed_data(self, encoders: dict, args) -> StreamedData:
        """data.streaming: the sources read as training goes (`lvit.data.stream`), checked as they are met."""
        recipe = self.recipe
        seed = args.data_seed or args.seed
        dataset = StreamedData(recipe.data, encoders, seed, self.skipped_file, recipe.source, sources=self.shards)
        self.prepared = Prepared(dataset, [], [], 0, None)
        shards = ", ".join(f"{s.name}: {len(files)} {kind} shard(s)" for s, kind, files in dataset.sources)
        log.info(
            "streaming the data (%s), %d samples read ahead per source and reader; global batch %d = %d per device "
            "x %d accumulation x %d process(es), %d steps",
            shards,
            recipe.data.shuffle_buffer,
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            args.world_size,
            args.max_steps,
        )
        return dataset

    def train(self) -> TrainingRun:
        resume_from = str(self.resume_from) if self.resume_from else None
        started = time.monotonic()
        try:
            self.metrics = self.trainer.train(resume_from_checkpoint=resume_from).metrics
        except UnreadableRecord as exc:
            raise self._stop_at(exc) from None
        self.wall_s = time.monotonic() - started
        stop = self.stop
        if stop.stopped_at is not None:
            raise Preempted(stop.signal_name, stop.stopped_at, self.out / f"checkpoint-{stop.stopped_at}")
        return self

    def _stop_at(self, problem: UnreadableRecord) -> Exception:
        """A record the header check passed cannot be read (a file cut off after its header, under
        `data.on_bad_record: error`): keep the steps done. The weights are those of the last complete step (an
        optimizer step never ran on the bad micro-batch), so they are saved as its checkpoint, with the run files,
        and the run stops with `BadRecordStop`; the same command resumes there once the record is fixed or
        skipped. Under several processes every rank stops at the same step (`LlavaTrainer.get_batch_samples`)."""
        trainer = self.trainer
        self.stop.on_train_end(trainer.args, trainer.state, trainer.control)  # the signal handlers go back
        step = trainer.state.global_step
        if step == 0:
            return LvitError(f"{problem.problem} (nothing trained yet); {BAD_RECORD_FIXES}.")
        folder = self.out / f"checkpoint-{step}"
        saved = folder.is_dir()  # already saved at this step by save_steps; every rank looks before any writes
        trainer.args.distributed_state.wait_for_everyone()
        if not saved:
            trainer._save_checkpoint(trainer.model, trial=None)
            trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
        log.warning("a record cannot be read: the %d complete step(s) are saved in %s", step, folder)
        return BadRecordStop(problem.problem, step, folder)

    def _facts(self) -> dict:
        """What `lvit_run.json` says of a finished run beside its recipe and metrics."""
        losses = [e["loss"] for e in self.history_entries() if isinstance(e.get("loss"), (int, float))]
        return {
            "steps": self.trainer.state.global_step,
            "records_trained": None if self.recipe.data.streaming else len(self.prepared.dataset),
            "final_loss": losses[-1] if losses else None,
            "started": self.segments[0].get("started"),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_runtime_s": round(sum(float(s.get("runtime_s") or 0.0) for s in self.segments), 3),
            "command": self.command,
            "versions": library_versions(),
        }

    @property
    def resumed_step(self) -> int:
        """The step this run resumed at (0: it started afresh)."""
        return int(self.resume_from.name.split("-")[-1]) if self.resume_from else 0

    def history_entries(self) -> list[dict]:
        """The run's `lvit_log.jsonl`: one entry per logging step, the whole run (resumed parts included)."""
        return history.read_log(self.out / LOG_FILE)

    def save(self) -> Path:
        prepared = self.prepared
        # the final count, with images that failed to decode mid-run (skip): what skipped_records.jsonl lists
        left_out = tidy_skipped(self.skipped_file) if self.main else len(prepared.skipped)
        steps, wall = self.trainer.state.global_step, getattr(self, "wall_s", 0.0)
        self.segments[-1].update(to_step=steps, runtime_s=round(float(self.metrics.get("train_runtime", wall)), 3))
        # the headline figures cover the whole run, its earlier segments included (lvit.train.segments)
        self.metrics = whole_run_metrics(self.metrics, self.history_entries(), self.segments, self.resumed_step, steps)
        save_run(self.trainer, self.recipe, self.processor, self.metrics, left_out, self.segments, self._facts())
        if left_out and self.main:
            of = "" if self.recipe.data.streaming else f" of {prepared.total}"
            log.warning("%d%s record(s) were left out of training (see %s)", left_out, of, self.skipped_file)
        if self.main:
            resumed = tuple(s["from_step"] for s in self.segments if s.get("from_step"))
            history.plot_history(self.history_entries(), self.out, title=self.out.name, resumed_at=resumed)
            whole = sum(float(s.get("runtime_s") or 0.0) for s in self.segments)
            log.info("%s", summarize(self, whole, left_out or len(prepared.skipped)).format())
        return self.out


def run(
    recipe: Recipe, resume: bool | None = None, allow_changed: tuple[str, ...] = (), command: str | None = None
) -> Path:
    """Train one recipe and save the run; returns the run folder (see `TrainingRun`).

    An output folder holding checkpoints of an unfinished run is resumed from its newest complete
    checkpoint (`resume=None`, the default; `True` requires one, `False` refuses). A folder holding
    anything else is never written into.
    """
    return TrainingRun(recipe, resume, allow_changed, command).setup().train().save()


def _setup_logging(main: bool) -> None:
    """Progress from the main process only; where messages go is the caller's choice (the CLI: stderr)."""
    logging.getLogger("lvit").setLevel(logging.INFO if main else logging.WARNING)


def library_versions() -> dict[str, str]:
    """The versions of lvit and the libraries a run depends on, as installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lvit", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
