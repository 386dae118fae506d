"""One training run: recipe -> model, data and `SFTTrainer` -> a saved run folder.

Read top to bottom: `TrainingRun.setup()` checks the recipe's inputs, builds the `SFTConfig`, assembles
the model, freezes it for its stage, prepares the data and builds the trainer; `train()` trains through
TRL; `save()` writes the run folder. `run(recipe)` does all three.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import SFTTrainer

from lvit import history
from lvit.console import quiet_libraries, show_progress_bar
from lvit.errors import LvitError
from lvit.precision import training_precision, upcast_trainable
from lvit.preemption import GracefulStop, Preempted
from lvit.recipe import Recipe, check_report_to, gradient_accumulation
from lvit.runs import (
    LOG_FILE,
    model_weight_files,
    resume_checkpoint,
    run_info,
    set_aside_incomplete,
    write_projector,
    write_run_files,
)

log = logging.getLogger("lvit")


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches whose order depends only on (seed, epoch)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class LlavaTrainer(SFTTrainer):
    """`SFTTrainer` with an optional separate learning rate for the projector and a compact LM head.

    TRL has no per-module learning rates (docs/stack-notes.md#trl-no-module-lr), so the optimizer's parameter groups are
    built here: projector / rest, each split into decay / no-decay like `Trainer` does.

    With `compact_head` the training loss scores only the labelled positions (`lvit.loss.compact_loss`); TRL's
    own loss runs where it does more than cross-entropy (another `loss_type`, label smoothing, a
    `compute_loss_func`, an MoE aux loss) and for evaluation. The metrics TRL logs stay: `entropy`,
    `mean_token_accuracy` (both over the labelled tokens, as TRL's) and `num_tokens` (real tokens, padding
    and packed filler excluded).
    """

    def __init__(
        self,
        *args,
        projector_lr: float | None = None,
        group_by_modality: bool = False,
        compact_head: bool = False,
        max_tokens_per_batch: int | None = None,
        **kwargs,
    ):
        self.projector_lr = projector_lr
        self.group_by_modality = group_by_modality
        self.compact_head = compact_head
        super().__init__(*args, **kwargs)
        self.token_budget = None
        if max_tokens_per_batch is not None:  # data.max_tokens_per_batch (lvit/data/token_budget.py)
            from lvit.data.token_budget import TokenBudgetBatchSampler

            if self.args.world_size > 1:
                raise LvitError(TOKEN_BUDGET_ONE_PROCESS)
            dataset = self.train_dataset
            self.token_budget = TokenBudgetBatchSampler(
                dataset["length"], dataset["id"], max_tokens_per_batch, self.args.data_seed or self.args.seed
            )
            sizes = [len(b) for b in self.token_budget.batches]
            log.info(
                "data.max_tokens_per_batch = %d: %d micro-batches of %d to %d samples (mean %.1f) an epoch, "
                "%d per optimizer step",
                max_tokens_per_batch,
                len(sizes),
                min(sizes),
                max(sizes),
                sum(sizes) / len(sizes),
                self.args.gradient_accumulation_steps,
            )

    def get_train_dataloader(self):
        if self.token_budget is None:
            return super().get_train_dataloader()
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        args = self.args
        # as Trainer._get_dataloader builds it, with the token-budget batches as the batch sampler
        # (transformers passes only its own BatchRebalanceSampler that way: docs/stack-notes.md#trainer-batch-sampler)
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.token_budget,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from lvit.data.packing import real_tokens

        packed = "row_lengths" in inputs
        tokens = real_tokens(inputs) if packed or "attention_mask" in inputs else None
        inputs = {k: v for k, v in inputs.items() if k != "row_lengths"}  # the packed rows' lengths: not a model input
        args = self.args
        if (
            not self.compact_head
            or return_outputs
            or not model.training
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or args.loss_type != "nll"
            or self.aux_loss_enabled
        ):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if packed and model.training:
                # TRL counts a batch without attention_mask as one row (docs/stack-notes.md#trl-num-tokens-padding-free)
                width = inputs["position_ids"].size(1)
                counts = torch.tensor([tokens, width], device=inputs["position_ids"].device)
                real, counted = self.accelerator.gather_for_metrics(counts[None]).sum(0).tolist()
                self._total_train_tokens += real - counted
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return out
        from lvit.loss import compact_loss

        loss, stats = compact_loss(model, inputs, num_items_in_batch)
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer.compute_loss: DDP averages the gradients
        gathered = {k: self.accelerator.gather_for_metrics(v.detach().reshape(1)).sum() for k, v in stats.items()}
        n = gathered["tokens"]
        # SFTTrainer's metric names and definitions (its `compute_loss`), so the logs read the same
        self._metrics["train"]["entropy"].append((gathered["entropy"] / n).item() if n > 0 else 0.0)
        self._metrics["train"]["mean_token_accuracy"].append((gathered["correct"] / n).item() if n > 0 else 0.0)
        if tokens is not None:
            local = torch.tensor(tokens, device=loss.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local.reshape(1)).sum().item()
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5.24 writes LLaVA checkpoints with the legacy key names (`language_model.model.*`)
        # but its resume path loads them with `load_state_dict(strict=False)` under the new names
        # (`model.language_model.*`): nothing is loaded and training silently restarts from the
        # initial weights. Map the keys back and load strictly. Adapters, DeepSpeed and FSDP keep
        # their own loaders.
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        files = model_weight_files(folder)
        if not files or self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from transformers.core_model_loading import revert_weight_conversion

        own = model.state_dict()
        by_tensor = {}
        for key, tensor in own.items():
            by_tensor.setdefault(id(tensor), key)
        to_model_key = {saved: by_tensor[id(t)] for saved, t in revert_weight_conversion(model, dict(own)).items()}
        state = {}
        for file in files:
            for key, tensor in load_file(str(file)).items():
                state[to_model_key.get(key, key)] = tensor
        missing = set(own) - set(state)
        # tied weights are saved once
        missing = {k for k in missing if not any(own[k] is own[o] for o in state if o in own)}
        unexpected = set(state) - set(own)
        if missing or unexpected:
            raise LvitError(
                f"{folder}: cannot resume, the checkpoint's weights do not fit this model "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})."
            )
        model.load_state_dict(state, strict=False)

    def _get_train_sampler(self, train_dataset=None):
        if self.group_by_modality:  # data.group_by_modality_length: LLaVA-1.5's single-modality steps
            from lvit.data.modality_sampler import ModalityGroupedSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            args = self.args
            step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
            has_image = [path is not None for path in dataset["image_path"]]
            return ModalityGroupedSampler(has_image, step, args.data_seed or args.seed)
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            # transformers' sampler draws from the global RNG, whose state differs between a run and
            # its resumption; seeding per epoch makes the data order the same in both.
            return EpochSeededLengthGroupedSampler(
                sampler.batch_size, sampler.lengths, self.args.data_seed or self.args.seed
            )
        return sampler

    def create_optimizer(self, model=None):
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault(("multi_modal_projector" in name, name in decay), []).append(param)
        param_groups = []
        for (is_projector, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if is_projector:
                group["lr"] = self.projector_lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


# How the loss is averaged (a difference from LLaVA, kept): transformers 5 divides the summed token loss
# of each micro-batch by the number of trained (label != -100) tokens in the whole global batch, i.e. all
# gradient_accumulation_steps micro-batches on all processes, so every trained token of an optimizer step
# weighs the same. LLaVA (transformers 4.31's Trainer) averaged the loss over each micro-batch's own tokens
# and then averaged those means, so a token in a short micro-batch weighed more. Read in transformers 5.24
# source, trainer.py: `Trainer._get_num_items_in_batch` (counts `labels[..., 1:] != -100` over the
# accumulated micro-batches and, with `average_tokens_across_devices`, default True in training_args.py,
# sums that count over processes) and `Trainer.compute_loss`; and in trl 1.16's `SFTTrainer.compute_loss`
# (trl/trainer/sft_trainer.py), which lvit's trainer uses: summed per-token loss / `num_items_in_batch`,
# times the process count (DDP then averages the gradients over processes).
TOKEN_BUDGET_ONE_PROCESS = (
    "data.max_tokens_per_batch works with one process only: with several, every process must take the same "
    "number of steps, which token-budget micro-batches do not guarantee (accelerate would repeat micro-batches "
    "to even them out). Train on one process, or remove data.max_tokens_per_batch."
)


def build_sft_config(recipe: Recipe, num_processes: int | None = None, check_device: bool = True):
    """The `SFTConfig` for a recipe: its `training:` section plus what lvit sets itself."""
    from trl import SFTConfig

    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.data.max_tokens_per_batch is not None and num_processes > 1:
        raise LvitError(f"{recipe.source}: {TOKEN_BUDGET_ONE_PROCESS}")
    kwargs: dict[str, Any] = dict(recipe.training)
    kwargs.setdefault("output_dir", f"runs/{Path(recipe.source).stem}")
    kwargs["gradient_accumulation_steps"] = gradient_accumulation(recipe, num_processes)
    # Autocast matching 16-bit weights; the trainable ones become fp32 masters (lvit.precision).
    kwargs.update(training_precision(recipe))
    # Random batches, as LLaVA samples them: the paper's code shuffles (Trainer's default), and LLaVA-1.5
    # groups by modality only (`--group_by_modality_length`: image and text-only megabatches, each of one
    # step's size and drawn at random; github.com/haotian-liu/LLaVA, llava/train/llava_trainer.py,
    # `get_modality_length_grouped_indices`). It never forms batches of similar length. Resume keeps the order:
    # accelerate's seedable sampler draws from (seed, epoch). A recipe may set "group_by_length" (less padding,
    # seeded per epoch by EpochSeededLengthGroupedSampler), which on lvit's tiny task lowered held-out accuracy
    # from 99% to 44%: a record's length follows its answer there, so such batches hold similar answers.
    kwargs.setdefault("train_sampling_strategy", "random")
    kwargs.update(
        remove_unused_columns=False,  # the collator needs the raw record columns
        dataset_kwargs={"skip_prepare_dataset": True},  # lvit tokenizes (exact masks) in its collator
        max_length=None,  # lvit enforces data.max_length itself, never cutting image tokens
    )
    if not check_device:
        # Validate the structure on a machine without the recipe's hardware (e.g. a bf16 recipe for
        # A100s checked on a laptop): device-dependent flags are checked by the real run.
        kwargs.update(bf16=False, fp16=False, tf32=None, use_cpu=True)
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise LvitError(f"{recipe.source}: the training section is not valid: {exc}") from None


def check_inputs(recipe: Recipe) -> None:
    """Everything that can be checked before a model loads: data files and folders, `training.report_to`."""
    check_data_inputs(recipe)
    check_report_to(recipe)


def check_data_inputs(recipe: Recipe) -> None:
    """The data files and folders a recipe names (and the eval data)."""
    data = recipe.data
    if not Path(data.path).exists():  # a file, or a Hugging Face dataset folder
        raise LvitError(
            f"{recipe.source}: data.path = {data.path!r}: file not found. Point it at a LLaVA- or chat-format "
            f"JSON/JSONL file or a Hugging Face dataset folder (override with `data.path=...`)."
        )
    if data.image_folder is not None and not Path(data.image_folder).is_dir():
        raise LvitError(f"{recipe.source}: data.image_folder = {data.image_folder!r}: folder not found.")
    if recipe.model.projector_from is not None and not Path(recipe.model.projector_from).is_dir():
        raise LvitError(
            f"{recipe.source}: model.projector_from = {recipe.model.projector_from!r}: folder not found; "
            "it should be the output folder of a finished stage-1 (align) run."
        )
    if recipe.eval.data is not None:
        from lvit.eval.callback import check_eval_inputs

        check_eval_inputs(recipe)


class TrainingRun:
    """One run, in the order it happens; each step is a method, so a test (or a tool) can look between them.

    - `setup()`: checks the recipe's inputs, decides about the output folder (start, or resume from its
      newest complete checkpoint), assembles the model and freezes it for its stage, prepares the data
      (the checks of `lvit data check`) and builds the trainer;
    - `train()`: the optimizer steps, through TRL (stops cleanly on SIGTERM / Ctrl-C);
    - `save()`: writes the run folder (`lvit.runs`) and returns it.

    `run(recipe)` does all three.
    """

    def __init__(self, recipe: Recipe, resume: bool | None = None):
        self.recipe = recipe
        self.resume = resume
        self.trainer: LlavaTrainer | None = None
        self.out: Path | None = None
        self.resume_from: Path | None = None

    def setup(self) -> TrainingRun:
        from lvit.data.collator import LlavaCollator
        from lvit.data.dataset import write_skipped
        from lvit.data.images import ImageLoader
        from lvit.data.shared import prepare_once
        from lvit.model import num_image_tokens
        from lvit.runs import SKIPPED_FILE
        from lvit.stages import format_report, report_modules
        from lvit.templates import ConversationEncoder

        recipe = self.recipe
        quiet_libraries()
        check_inputs(recipe)
        args = build_sft_config(recipe)
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
        encoder = ConversationEncoder(
            recipe.data.template, tokenizer, model.config.image_token_id, num_image_tokens(model.config.vision_config)
        )
        # the checks of `lvit data check`, on rank 0 only; every rank trains on the records rank 0 kept
        self.prepared = prepared = prepare_once(recipe.data, encoder, recipe.source)
        dataset, self.skipped_file = prepared.dataset, out / SKIPPED_FILE
        if prepared.skipped:
            if main:
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

        collator = LlavaCollator(
            encoder,
            ImageLoader(processor.image_processor, recipe.data.image_folder, recipe.data.image_aspect_ratio),
            tokenizer.pad_token_id,
            recipe.data.max_length,
            skipped_file=self.skipped_file if recipe.data.on_bad_record == "skip" else None,
            **packing_options(recipe, model),
        )
        self.processor = processor
        self.stop = GracefulStop()
        self.trainer = trainer = LlavaTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=processor,
            projector_lr=recipe.projector_lr,
            group_by_modality=recipe.data.group_by_modality_length,
            compact_head=recipe.compact_head,
            max_tokens_per_batch=recipe.data.max_tokens_per_batch,
            callbacks=[
                RunFilesCallback(recipe, processor),
                self.stop,
                *_eval_callbacks(recipe, processor, encoder, args),
            ],
        )
        if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
            trainer.accelerator.state.fsdp_plugin.state_dict_type
        ):
            raise LvitError(
                "FSDP with a sharded state dict: the Trainer would save no model weights. Set fsdp_state_dict_type: "
                "FULL_STATE_DICT in the accelerate config (see recipes/accelerate/fsdp_8gpu.yaml)."
            )
        self.history = history.install(trainer, out / LOG_FILE, show_progress_bar(recipe, args))
        return self

    def train(self) -> TrainingRun:
        resume_from = str(self.resume_from) if self.resume_from else None
        started = time.monotonic()
        self.metrics = self.trainer.train(resume_from_checkpoint=resume_from).metrics
        self.wall_s = time.monotonic() - started
        stop = self.stop
        if stop.stopped_at is not None:
            raise Preempted(stop.signal_name, stop.stopped_at, self.out / f"checkpoint-{stop.stopped_at}")
        return self

    @property
    def resumed_step(self) -> int:
        """The step this run resumed at (0: it started afresh)."""
        return int(self.resume_from.name.split("-")[-1]) if self.resume_from else 0

    def history_entries(self) -> list[dict]:
        """The run's `lvit_log.jsonl`: one entry per logging step, the whole run (resumed parts included)."""
        return history.read_log(self.out / LOG_FILE)

    def save(self) -> Path:
        from lvit.data.dataset import tidy_skipped

        prepared = self.prepared
        # the final count, with images that failed to decode mid-run (skip): what skipped_records.jsonl lists
        left_out = tidy_skipped(self.skipped_file) if self.main else len(prepared.skipped)
        save_run(self.trainer, self.recipe, self.processor, self.metrics, skipped=left_out)
        if left_out and self.main:
            log.warning(
                "%d of %d record(s) were left out of training (see %s)", left_out, prepared.total, self.skipped_file
            )
        if self.main:
            from lvit.summary import summarize

            history.plot_history(self.history_entries(), self.out, title=str(self.out))
            log.info("%s", summarize(self, getattr(self, "wall_s", 0.0), left_out or len(prepared.skipped)).format())
        return self.out


def run(recipe: Recipe, resume: bool | None = None) -> Path:
    """Train one recipe and save the run; returns the run folder (see `TrainingRun`).

    An output folder holding checkpoints of an unfinished run is resumed from its newest complete
    checkpoint (`resume=None`, the default; `True` requires one, `False` refuses). A folder holding
    anything else is never written into.
    """
    return TrainingRun(recipe, resume).setup().train().save()


def packing_options(recipe: Recipe, model) -> dict:
    """The collator's packing arguments for this recipe and model; refuses attention that would mix samples."""
    data = recipe.data
    if not data.packing:
        return {}
    from lvit.data.packing import VARLEN_ATTENTION, check_attention

    # the implementation the language model runs with (transformers sets it on every sub-config)
    attn = model.config.get_text_config()._attn_implementation
    check_attention(attn, f"{recipe.source}: model.attn_implementation")
    one_row = attn in VARLEN_ATTENTION  # flash varlen reads sample bounds only from a single row
    row = None if one_row else (data.max_tokens_per_row or data.max_length)
    log.info("packing: padding-free rows of at most %s tokens (%s attention)", row or "all the batch's", attn)
    return {"packing": True, "max_tokens_per_row": row}


def build_model(recipe: Recipe, args):
    """The recipe's LLaVA model, frozen for its stage, with adapters for lora/qlora and fp32 masters.

    Returns `(model, processor)`; the model is a `PeftModel` for lora/qlora. Seeds first: the
    projector's (and adapters') initialisation is part of the run.
    """
    import transformers

    from lvit.model import assemble
    from lvit.stages import apply_stage

    transformers.set_seed(args.seed)
    model, processor = assemble(
        recipe.model,
        recipe.source,
        quantize_lm=recipe.method == "qlora",
        compute_dtype=recipe.lora.compute_dtype,
        on_cpu=args.use_cpu,
        template=recipe.data.template,
    )
    apply_stage(model, recipe.stage, recipe.model.projector, train_lm=recipe.method == "full")
    if recipe.method != "full":
        from lvit.adapters import add_lora

        model = add_lora(model, recipe.lora, recipe.model.projector)
    if args.deepspeed_plugin is None:
        # fp32 masters for what trains, the rest stays in model.torch_dtype (lvit.precision). DeepSpeed keeps
        # its own: its engine casts the module to bf16 (and checks that a ZeRO-Init model's parameters are
        # bf16) and its ZeRO optimizer holds fp32 partitions of the weights and Adam state (DeepSpeed
        # source: deepspeed/runtime/engine.py, `_configure_distributed_model`; docs/code-docs/source/zero3.rst).
        upcast_trainable(model)
    return model, processor


class RunFilesCallback(TrainerCallback):
    """Puts the recipe, run summary and processor into every checkpoint, so each one can be
    resumed, exported or chatted with on its own."""

    def __init__(self, recipe: Recipe, processor):
        self.recipe = recipe
        self.processor = processor

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_run_files(folder, self.recipe, run_info(self.recipe))
                self.processor.save_pretrained(folder)


def save_run(trainer, recipe: Recipe, processor, metrics: dict, skipped: int = 0) -> None:
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
        write_run_files(out, recipe, run_info(recipe, metrics, skipped))
        log.info("run saved to %s", out)


def _eval_callbacks(recipe: Recipe, processor, encoder, args) -> list:
    """Evaluation during training (a recipe's `eval:` section); see `lvit.eval.callback`."""
    if recipe.eval.data is None:
        return []
    from lvit.eval.callback import eval_callbacks

    return eval_callbacks(recipe, processor, encoder, args)


def _setup_logging(main: bool) -> None:
    """Progress from the main process only; where messages go is the caller's choice (the CLI: stderr)."""
    log.setLevel(logging.INFO if main else logging.WARNING)
