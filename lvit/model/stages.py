"""Which parameters train in each stage, and a per-module report of it.

- `align` (stage 1): only the projector trains; CLIP and the language model are frozen.
- `finetune` (stage 2): the projector and the whole language model (embeddings and LM head
  included) train; CLIP stays frozen.

With `projector: linear`, the projector's `linear_2` is the frozen identity in both stages (see
`lvit.model`), so exactly one (vision_hidden x text_hidden) matrix and its bias train there.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from lvit.model.projector import freeze_identity

log = logging.getLogger(__name__)


def apply_stage(model, stage: str, projector: str, train_lm: bool = True, train_tower: bool = False) -> None:
    """Set `requires_grad` for `stage` ("align" or "finetune") on an assembled LLaVA model.

    `train_lm=False` (LoRA, QLoRA) keeps the language model's own weights frozen in `finetune`:
    its adapters, added afterwards, are what trains. `train_tower` (a recipe's `vision_tower_lr`) trains the
    vision tower in `finetune` too, up to its feature layer (`tower_unused`).
    """
    if stage not in ("align", "finetune"):
        raise ValueError(f"unknown stage {stage!r}")
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if getattr(model.model, "image_newline", None) is not None:  # LLaVA-NeXT's row ends train with the projector
        model.model.image_newline.requires_grad_(True)
    if stage == "finetune" and train_lm:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if stage == "finetune" and train_tower:
        tower = model.model.vision_tower
        tower.requires_grad_(True)
        for name in tower_unused(tower, model.config):
            tower.get_submodule(name).requires_grad_(False)
    freeze_identity(model, projector)
    # CLIP and SigLIP have no dropout by default: eval mode changes nothing in their forward, trained or not.
    model.model.vision_tower.eval()


def tower_unused(tower, config) -> list[str]:
    """The tower's submodules whose output never reaches the projector: the encoder layers after the feature layer
    (LLaVA's -2: the last one), the post-layernorm and SigLIP's pooling head (`hidden_states[k]` is taken before
    them). Training them would give them no gradient, which multi-GPU DDP refuses."""
    inner = getattr(tower, "vision_model", tower)
    prefix = "vision_model." if inner is not tower else ""
    layers = inner.encoder.layers
    chosen = config.vision_feature_layer
    deepest = max(chosen) if isinstance(chosen, list | tuple) else chosen
    used = deepest if deepest >= 0 else len(layers) + 1 + deepest  # hidden_states[k] is after k layers
    unused = [f"{prefix}encoder.layers.{i}" for i in range(used, len(layers))]
    return unused + [f"{prefix}{n}" for n in ("post_layernorm", "head") if hasattr(inner, n)]


class ModuleRow(NamedTuple):
    """One line of the per-module report: parameter counts and dtypes, trainable and frozen."""

    name: str
    trainable: int
    frozen: int
    trainable_dtypes: tuple[str, ...] = ()
    frozen_dtypes: tuple[str, ...] = ()


_SHORT_DTYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def _dtype_name(param) -> str:
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:  # a bitsandbytes 4-bit weight, stored packed in uint8
        return str(getattr(quant_state, "quant_type", "4bit"))
    return _SHORT_DTYPE.get(str(param.dtype), str(param.dtype).removeprefix("torch."))


def report_modules(model) -> list[ModuleRow]:
    """Parameter counts and dtypes (trainable, frozen) for the parts of a LLaVA model (and LLaVA-NeXT's
    `image_newline`)."""
    parts = [
        ("model.vision_tower", model.model.vision_tower.parameters()),
        *[
            (f"model.multi_modal_projector.{n}", m.parameters())
            for n, m in model.model.multi_modal_projector.named_children()
            if any(True for _ in m.parameters())
        ],
        *[(f"model.language_model.{n}", m.parameters()) for n, m in model.model.language_model.named_children()],
        ("lm_head", model.lm_head.parameters()),
    ]
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        parts.insert(1, ("model.image_newline", [newline]))
    rows, seen = [], set()
    for name, params in parts:
        trainable = frozen = 0
        dtypes: dict[bool, set[str]] = {True: set(), False: set()}
        for p in params:
            if id(p) in seen:  # tied weights are counted once
                continue
            seen.add(id(p))
            # A 4-bit weight is stored packed (two values a byte); count the values it stands for.
            quant_state = getattr(p, "quant_state", None)
            n = quant_state.shape.numel() if quant_state is not None else p.numel()
            if p.requires_grad:
                trainable += n
            else:
                frozen += n
            dtypes[p.requires_grad].add(_dtype_name(p))
        rows.append(ModuleRow(name, trainable, frozen, tuple(sorted(dtypes[True])), tuple(sorted(dtypes[False]))))
    return rows


def format_report(rows: list[ModuleRow]) -> str:
    """The report as a table; `dtype` lists the trainable parameters' dtypes, then the frozen ones'."""
    width = max(len(r.name) for r in rows)

    def dtype_cell(row: ModuleRow) -> str:
        cells = []
        if row.trainable_dtypes:
            cells.append(f"trains {','.join(row.trainable_dtypes)}")
        if row.frozen_dtypes:
            cells.append(f"frozen {','.join(row.frozen_dtypes)}")
        return "; ".join(cells)

    lines = [f"{'module':<{width}}  {'trainable':>14}  {'frozen':>14}  {'state':<13}  dtype"]
    for row in rows:
        state = "trains" if row.trainable and not row.frozen else "frozen" if not row.trainable else "partly trains"
        lines.append(f"{row.name:<{width}}  {row.trainable:>14,}  {row.frozen:>14,}  {state:<13}  {dtype_cell(row)}")
    total_t = sum(r.trainable for r in rows)
    total_f = sum(r.frozen for r in rows)
    lines.append(f"{'total':<{width}}  {total_t:>14,}  {total_f:>14,}")
    return "\n".join(lines)
