"""Which parameters train in each stage, and a per-module report of it.

- `align` (stage 1): only the projector trains; CLIP and the language model are frozen.
- `finetune` (stage 2): the projector and the whole language model (embeddings and LM head
  included) train; CLIP stays frozen.

With `projector: linear`, the projector's `linear_2` is the frozen identity in both stages (see
`lvit.model`), so exactly one (vision_hidden x text_hidden) matrix and its bias train there.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def apply_stage(model, stage: str, projector: str, train_lm: bool = True) -> None:
    """Set `requires_grad` for `stage` ("align" or "finetune") on an assembled LLaVA model.

    `train_lm=False` (LoRA, QLoRA) keeps the language model's own weights frozen in `finetune`:
    its adapters, added afterwards, are what trains.
    """
    if stage not in ("align", "finetune"):
        raise ValueError(f"unknown stage {stage!r}")
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == "finetune" and train_lm:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if projector == "linear":
        model.model.multi_modal_projector.linear_2.requires_grad_(False)
    # A frozen tower needs no dropout or train-mode behaviour; the Trainer calls model.train(),
    # and CLIP has no dropout by default, so this is only about intent.
    model.model.vision_tower.eval()


def report_modules(model) -> list[tuple[str, int, int]]:
    """(module, trainable, frozen) parameter counts for the parts of a LLaVA model."""
    parts = [
        ("model.vision_tower", model.model.vision_tower),
        *[
            (f"model.multi_modal_projector.{n}", m)
            for n, m in model.model.multi_modal_projector.named_children()
            if any(True for _ in m.parameters())
        ],
        *[(f"model.language_model.{n}", m) for n, m in model.model.language_model.named_children()],
        ("lm_head", model.lm_head),
    ]
    rows, seen = [], set()
    for name, module in parts:
        trainable = frozen = 0
        for p in module.parameters():
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
        rows.append((name, trainable, frozen))
    return rows


def format_report(rows: list[tuple[str, int, int]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'module':<{width}}  {'trainable':>14}  {'frozen':>14}  state"]
    for name, trainable, frozen in rows:
        state = "trains" if trainable and not frozen else "frozen" if not trainable else "partly trains"
        lines.append(f"{name:<{width}}  {trainable:>14,}  {frozen:>14,}  {state}")
    total_t = sum(r[1] for r in rows)
    total_f = sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {total_t:>14,}  {total_f:>14,}")
    return "\n".join(lines)
