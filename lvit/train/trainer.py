"""`LlavaTrainer`: TRL's `SFTTrainer` with a projector learning rate, a compact LM head, modality-grouped steps and
token-budget micro-batches."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from lvit.data.length_sampler import EpochSeededLengthGroupedSampler
from lvit.data.mixture import Plan
from lvit.data.mixture_sampler import MixtureSampler, first_epoch_rows
from lvit.data.modality_sampler import ModalityGroupedSampler
from lvit.data.packing import real_tokens
from lvit.data.token_budget import TokenBudgetBatchSampler
from lvit.errors import LvitError, UnreadableRecord
from lvit.model.next import load_newline, newline_of, save_newline
from lvit.runs.files import model_weight_files
from lvit.train.config import TOKEN_BUDGET_ONE_PROCESS
from lvit.train.loss import compact_loss
from lvit.train.source_stats import SourceStats
from lvit.train.streamed import save_data_position, skip_batches, step_started, streamed_loader

log = logging.getLogger(__name__)


class LlavaTrainer(SFTTrainer):
    """`SFTTrainer` with an optional separate learning rate for the projector and a compact LM head.

    TRL has no per-module learning rates (docs/stack-notes.md#trl-no-module-lr), so the optimizer's parameter groups are
    built here: projector / rest, each split into decay / no-decay like `Trainer` does.

    With `compact_head` the training loss scores only the labelled positions (`lvit.train.loss.compact_loss`); TRL's
    own loss runs where it does more than cross-entropy (another `loss_type`, label smoothing, a
    `compute_loss_func`, an MoE aux loss) and for evaluation. The metrics TRL logs stay: `entropy`,
    `mean_token_accuracy` (both over the labelled tokens, as TRL's) and `num_tokens` (real tokens, padding
    and packed filler excluded).

    Its knobs are fields of its config, `lvit.train.config.LlavaSFTConfig` (TRL's trainer/config pair); with a plain
    `SFTConfig` it trains as `SFTTrainer` does, the projector at the model's learning rate.
    """

    @property
    def projector_lr(self) -> float | None:
        return _knob(self.args, "projector_lr")

    @property
    def vision_tower_lr(self) -> float | None:
        return _knob(self.args, "vision_tower_lr")

    @property
    def compact_head(self) -> bool:
        return bool(_knob(self.args, "compact_head"))

    @property
    def group_by_modality(self) -> bool:
        return bool(_knob(self.args, "group_by_modality"))

    def __init__(
        self,
        *args,
        mixture: Plan | None = None,
        record_mixture_to=None,
        source_names: list[str] | None = None,
        streamed: bool = False,
        **kwargs,
    ):
        self.mixture = mixture
        """A mixture's plan (`lvit.data.mixture`): each epoch's draws come from it."""
        self.record_mixture_to = record_mixture_to
        self.source_stats = SourceStats(source_names) if source_names else None
        """A mixture's sources (planned or streamed): the loss is logged per source."""
        self.streamed = streamed
        """data.streaming: the train dataset is a `lvit.data.stream.dataset.StreamedData`."""
        self.resume_data_from = None
        """The checkpoint a run resumes from: a streamed run's data position is read from it."""
        self._data_position_loaded = False
        self._stopping = False
        streamed_data = kwargs.get("train_dataset") if streamed else None
        if streamed:  # TRL takes only `datasets` datasets (docs/stack-notes.md#trl-dataset-types); ours is set after
            import datasets

            kwargs["train_dataset"] = datasets.Dataset.from_dict({"id": ["(streamed)"]})
        super().__init__(*args, **kwargs)
        if streamed:
            self.train_dataset = streamed_data
        self.token_budget = None
        max_tokens_per_batch = _knob(self.args, "max_tokens_per_batch")
        if max_tokens_per_batch is not None:  # data.max_tokens_per_batch (lvit/data/token_budget.py)
            if self.args.world_size > 1:
                raise LvitError(TOKEN_BUDGET_ONE_PROCESS)
            dataset, seed = self.train_dataset, self.args.data_seed or self.args.seed
            pool = first_epoch_rows(mixture, seed) if mixture is not None else None
            self.token_budget = TokenBudgetBatchSampler(
                dataset["length"], dataset["id"], max_tokens_per_batch, seed, pool=pool
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
        if self.streamed:
            return streamed_loader(self)
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
        packed = "row_lengths" in inputs
        tokens = real_tokens(inputs) if packed or "attention_mask" in inputs else None
        label_sources, sample_sources = inputs.get("label_sources"), inputs.get("sample_sources")
        # the packed rows' lengths and a mixture's sources: not model inputs
        inputs = {k: v for k, v in inputs.items() if k not in ("row_lengths", "label_sources", "sample_sources")}
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

        by_source = label_sources is not None and self.source_stats is not None
        n_sources = len(self.source_stats.names) if by_source else 0
        loss, stats = compact_loss(model, inputs, num_items_in_batch, label_sources if by_source else None, n_sources)
        if by_source:
            self.source_stats.add(
                stats.pop("source_loss"), stats.pop("source_tokens"), sample_sources, num_items_in_batch
            )
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with a mixture's loss, share, samples and tokens per source (`lvit.train.source_stats`)
        in each training log and the last one."""
        if self.source_stats is not None and ("loss" in logs or "train_runtime" in logs):
            logs = {**logs, **self.source_stats.pop(self.accelerator)}
        super().log(logs, start_time)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """A streamed run restored its data position from the checkpoint (`streamed_loader`): nothing to skip; without
        one, its own loader reads the trained batches again and drops them (`skip_batches`)."""
        if self.streamed:
            return dataloader if self._data_position_loaded else skip_batches(dataloader, num_batches)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def _save_checkpoint(self, model, trial):
        if self.streamed:  # first, so a checkpoint the Trainer completes always has it (lvit/train/streamed.py)
            save_data_position(self, trial, at_step_start=self._stopping)
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # LoRA / QLoRA NeXT: its trained image_newline beside the adapter
            save_newline(self.model, output_dir or self.args.output_dir)

    def create_model_card(self, *args, **kwargs) -> None:
        """No TRL card: TRL writes one into the output folder at every checkpoint (a text model "fine-tuned from
        None"), and a run stopped while saving its first checkpoint then left a folder that looked like another's
        (`lvit.runs.resume`). lvit writes its own card into the run folder and each checkpoint
        (`lvit.runs.files.run_card`)."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # docs/stack-notes.md#resume-legacy-keys: transformers 5.24 and 5.25 (checked) write LLaVA checkpoints with
        # the legacy key names (`language_model.model.*`) but resume with `load_state_dict(strict=False)` under the
        # new names (`model.language_model.*`): nothing loads and training silently restarts from the initial
        # weights. Map the keys back and load strictly. Guarded: on a transformers without the conversion
        # (`_legacy_key_map` is None) or one that saves the model's own names (the map renames nothing), the
        # Trainer's loader runs. Adapters, DeepSpeed and FSDP keep their own loaders.
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        files = model_weight_files(folder)
        own, to_model_key = None, None
        if files and not (self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config")):
            own = model.state_dict()
            to_model_key = _legacy_key_map(model, own)
        if not to_model_key:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if hasattr(model, "peft_config") and newline_of(model) is not None:
                load_newline(model, folder)
            return
        from safetensors.torch import load_file

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

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's, with a record it cannot read made every process's stop: the process whose batch holds it
        says so at this step's start (before any forward), all agree on the message, and all raise it, so
        `lvit.train.run.TrainingRun` saves the steps done on every rank instead of the others waiting forever."""
        batches, problem = [], None
        if self.streamed:
            step_started(self)
        try:
            for _ in range(num_batches):
                try:
                    batches.append(next(epoch_iterator))
                except StopIteration:
                    break
        except UnreadableRecord as exc:
            problem = exc.problem
        if self.args.world_size > 1:
            import torch.distributed as dist

            said = [None] * dist.get_world_size()
            dist.all_gather_object(said, problem)
            problem = next((p for p in said if p is not None), None)
        if problem is not None:
            self._stopping = True  # the checkpoint saved now holds the data position of this step's start
            raise UnreadableRecord(problem)
        return batches, self._get_num_items_in_batch(batches, device)

    def _get_train_sampler(self, train_dataset=None):
        if self.mixture is not None:
            return self._mixture_sampler(train_dataset if train_dataset is not None else self.train_dataset)
        if self.group_by_modality:  # data.group_by_modality_length: LLaVA-1.5's single-modality steps
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

    def _mixture_sampler(self, dataset) -> MixtureSampler:
        """Each epoch's draws of the mixture, shuffled together, or grouped by modality or length as without one."""
        args = self.args
        base = super()._get_train_sampler(dataset)
        arrange, step = "random", 1
        if self.group_by_modality:
            arrange = "modality"
            step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        elif isinstance(base, LengthGroupedSampler):
            arrange, step = "length", base.batch_size  # the Trainer's own megabatch size
        return MixtureSampler(
            self.mixture,
            args.data_seed or args.seed,
            arrange,
            has_image=[path is not None for path in dataset["image_path"]] if arrange == "modality" else None,
            lengths=list(dataset["length"]) if arrange == "length" else None,
            step_size=step,
            ids=list(dataset["id"]),
            indices=list(dataset["index"]),
            record_to=self.record_mixture_to if args.process_index == 0 else None,
        )

    def create_optimizer(self, model=None):
        """Parameter groups by part (projector, vision tower, the rest) and weight decay; the projector's and the
        tower's take their own learning rates when the recipe sets them."""
        lrs = {"multi_modal_projector": self.projector_lr, "vision_tower": self.vision_tower_lr}
        if all(lr is None for lr in lrs.values()) or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str | None, bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                # LLaVA-NeXT's image_newline is part of the projection of image features: the projector's lr
                part = "multi_modal_projector" if name.endswith("image_newline") else None
                part = part or next((p for p in lrs if f"{p}." in name), None)
                groups.setdefault((part, name in decay), []).append(param)
        param_groups = []
        for (part, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if part is not None and lrs[part] is not None:
                group["lr"] = lrs[part]
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)


def _knob(args, name: str):
    """A `LlavaSFTConfig` field, or its default (None / off) on a plain `SFTConfig`."""
    return getattr(args, name, None)


def _legacy_key_map(model, own: dict) -> dict[str, str] | None:
    """Saved key -> the model's key, for the keys transformers saves under another name (legacy LLaVA names); None
    where this transformers has no such conversion (`transformers.core_model_loading.revert_weight_conversion`,
    5.x)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    by_tensor = {}
    for key, tensor in own.items():
        by_tensor.setdefault(id(tensor), key)
    mapping = {saved: by_tensor[id(t)] for saved, t in revert_weight_conversion(model, dict(own)).items()}
    return mapping if any(saved != key for saved, key in mapping.items()) else {}
