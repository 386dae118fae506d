"""The projector between the vision tower and the language model: LLaVA's linear W or LLaVA-1.5's mlp2x_gelu, in the
stock two-linear module."""

from __future__ import annotations

import logging

import torch

from lvit.errors import LvitError
from lvit.runs.files import read_projector

log = logging.getLogger(__name__)


ACTIVATIONS = {"linear": "linear", "mlp2x_gelu": "gelu"}


def new_projector(config, kind: str, dtype: torch.dtype):
    """A freshly initialised projector; for `linear`, `linear_2` is the frozen identity."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    projector = LlavaMultiModalProjector(config).to(dtype)
    if kind == "linear":
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(config.text_config.hidden_size, dtype=dtype))
            projector.linear_2.bias.zero_()
    freeze_identity(projector, kind)
    return projector


def freeze_identity(model, kind: str) -> None:
    """`projector: linear` is LLaVA's one matrix W in the stock two-linear projector: its `linear_2` is the identity
    and never trains. Freezes every `linear_2` of a projector in `model` (a projector, a LLaVA model, or a
    `PeftModel` whose `modules_to_save` made a trainable copy of the projector); `mlp2x_gelu` trains both."""
    if kind != "linear":
        return
    for name, module in model.named_modules():
        if name == "linear_2" or ("multi_modal_projector" in name and name.endswith(".linear_2")):
            module.requires_grad_(False)


def load_projector(model, run_dir: str, kind: str, source: str = "<recipe>") -> None:
    """Load a stage-1 run's projector (`lvit.runs.files.read_projector`) into `model`, checking type and shapes."""
    state, path = read_projector(run_dir, kind, source)
    target = model.model.multi_modal_projector
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise LvitError(
            f"{source}: the projector in {path} has shapes {got}, this model needs {expected} "
            "(different vision tower or language model than the stage-1 run?)."
        )
    dtype = next(target.parameters()).dtype
    target.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    log.info("projector initialised from %s", path)
