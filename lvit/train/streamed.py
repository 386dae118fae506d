"""The data loader of a streamed run (`data.streaming`) and its place in the data, saved in every checkpoint.

torchdata's `StatefulDataLoader` iterates `lvit.data.stream.dataset.StreamedData` (each process its own shards, no
accelerate sharding) and keeps each data-loader worker's position with it (`state_dict`: as of the last batch it
gave, prefetching accounted for). Each process writes its loader's state into a checkpoint folder before the
Trainer writes anything there (`DATA_POSITION`, with the processes and workers it was read with), so a checkpoint
the Trainer completed always has it. A resumed run loads it and the Trainer skips nothing: the data continues at
the sample after the last one trained. A run stopped by a record it cannot read saves the position of the start of
the step it could not take (`step_started`), so the resumed run takes that step again, whole.

A checkpoint without the file (saved by an older lvit) falls back to reading the trained batches again, through
this same loader, and skipping them: the same samples, slower.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch

from lvit.errors import LvitError

log = logging.getLogger(__name__)

DATA_POSITION = "lvit_data_position-rank{rank}.pt"


def streamed_loader(trainer):
    """The run's `StatefulDataLoader`, at the checkpoint's data position when the run resumes."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    # torchdata 0.11 calls a torch API that torch 2.13 deprecates, on every iterator (docs/stack-notes.md#torchdata)
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    args = trainer.args
    workers = args.dataloader_num_workers
    extra = {"prefetch_factor": args.dataloader_prefetch_factor, "persistent_workers": True} if workers else {}
    loader = StatefulDataLoader(
        trainer.train_dataset,
        batch_size=args.per_device_train_batch_size,
        collate_fn=trainer.data_collator,
        num_workers=workers,
        pin_memory=args.dataloader_pin_memory,
        **extra,
    )
    if trainer.resume_data_from is not None:
        path = Path(trainer.resume_data_from) / DATA_POSITION.format(rank=args.process_index)
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            readers = {"processes": args.world_size, "workers": workers}
            was = {k: saved.get(k) for k in readers}
            if was != readers:
                raise LvitError(
                    f"{path}: the data position was saved by {was['processes']} process(es) with "
                    f"{was['workers']} data-loader worker(s) each; this run has {readers['processes']} with "
                    f"{readers['workers']}. Each reads its own shards, so resume with the same processes and "
                    f"training.dataloader_num_workers={was['workers']}."
                )
            loader.load_state_dict(saved["state"])
            trainer._data_position_loaded = True
            log.info("data.streaming: the data continues where %s left it", Path(trainer.resume_data_from).name)
        else:
            log.warning(
                "%s has no data position (%s); the batches already trained are read again and skipped",
                trainer.resume_data_from,
                path.name,
            )
    trainer._streamed_loader = loader
    return loader


def skip_batches(loader, n: int):
    """The loader past its first `n` batches (read and dropped), as a loader whose next iterator starts there."""
    batches = iter(loader)
    for _ in range(n):
        next(batches)
    loader.load_state_dict(loader.state_dict())
    return loader


def step_started(trainer) -> None:
    """Keep the position at the start of an optimizer step (what a stop in that step saves)."""
    loader = getattr(trainer, "_streamed_loader", None)
    if loader is not None:
        trainer._step_start_position = copy.deepcopy(loader.state_dict())


def save_data_position(trainer, trial, at_step_start: bool = False) -> None:
    """This process's data position into the checkpoint about to be saved (its folder made if need be); with
    `at_step_start`, the position at the start of the step now running (a stop before the step is taken)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    loader = getattr(trainer, "_streamed_loader", None)
    if loader is None:
        return
    state = getattr(trainer, "_step_start_position", None) if at_step_start else None
    state = state if state is not None else loader.state_dict()
    args = trainer.args
    folder = Path(trainer._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DATA_POSITION.format(rank=args.process_index)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"processes": args.world_size, "workers": args.dataloader_num_workers, "state": state}, tmp)
    tmp.replace(path)
