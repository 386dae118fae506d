"""Stopping cleanly on preemption: SIGTERM (a preempted cloud machine) and Ctrl-C.

The run saves a checkpoint at the end of the current step and stops; running the same command
again resumes from it (`lvit.runs.resume.resume_checkpoint`). The run then raises `Preempted` (not an
`LvitError`: nothing is wrong), which `lvit finetune` turns into its own exit status, `exit_status`:
128 + the signal's number, what a shell reports for a process the signal ended (143 for SIGTERM, 130
for Ctrl-C), so a scheduler's or wrapper's rule for "killed by SIGTERM, requeue it" (SLURM's
`--requeue` scripts, Kubernetes' restart on 143) keeps working, and it differs from 1 (a dry run
found problems) and 2 (an error).
"""

from __future__ import annotations

import contextlib
import logging
import signal

from transformers import TrainerCallback

from lvit.errors import Preempted, exit_status  # noqa: F401 (lvit.errors.Preempted is where one looks)

log = logging.getLogger(__name__)


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current step, save a checkpoint, stop.

    A second Ctrl-C stops at once. Under several processes the stop is agreed at the end of each
    step (an all-reduce of one flag), so every rank saves the same step.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.from_other_process = False
        self.stopped_at: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to stop at once)",
            self.signal_name,
        )

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_stop():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def _agreed_stop(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.signal_name is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(
                [1.0 if flag else 0.0],
                device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu",
            )
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.signal_name is None:  # another rank got it (a scheduler signals every process)
                self.signal_name, self.from_other_process = "SIGTERM", True
        return flag
