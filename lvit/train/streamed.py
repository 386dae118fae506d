"""The data loader of a streamed run (`data.streaming`) and its place in the data, saved in every checkpoint.

torchdata's `StatefulDataLoader` iterates `lvit.data.stream.dataset.StreamedData` (each process its own shards, no
accelerate sharding) and saves each data-loader worker's position with it (`state_dict`: as of the last batch it
gave, prefetching accounted for). At a checkpoint each process writes its loader's state into the checkpoint
folder (`DATA_POSITION`); a resumed run loads it, so the Trainer skips nothing and the data continues at the
sample after the last one trained. A checkpoint without the file (saved before lvit wrote it) falls back to the
Trainer's skipping of the batches already trained: the same samples, read again.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

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
            loader.load_state_dict(torch.load(path, weights_only=True))
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


def save_data_position(trainer, trial) -> None:
    """This process's data position into the checkpoint just saved."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    loader = getattr(trainer, "_streamed_loader", None)
    if loader is None:
        return
    folder = Path(trainer._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (DATA_POSITION.format(rank=trainer.args.process_index) + ".tmp")
    torch.save(loader.state_dict(), tmp)
    tmp.replace(tmp.with_suffix(""))
