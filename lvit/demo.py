"""`lvit demo`: a tiny LLaVA trained end to end, offline, through the same recipes as real runs.

1. Builds a tiny CLIP and a tiny Llama (with a locally trained tokenizer) and saves them as
   Hugging Face folders; the runs load them back with `from_pretrained`.
2. Writes a synthetic image-instruction dataset (LLaVA JSON + PNG files).
3. Runs `recipes/tiny_stage1.yaml` (align) then `recipes/tiny_stage2.yaml` (finetune) with
   `lvit.train.run`, exactly what `lvit finetune` does.
4. Loads the stage-2 run with plain transformers and reports held-out accuracy beside chance.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import typer

from lvit.errors import LvitError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def demo_overrides(out: Path, stage: int) -> list[str]:
    """Overrides that point a tiny recipe at the demo's folder `out`."""
    common = [
        f"model.vision_tower={out / 'parts/tiny-clip'}",
        f"model.language_model={out / 'parts/tiny-vicuna'}",
        f"data.image_folder={out / 'data/images'}",
    ]
    if stage == 1:
        return [*common, f"data.path={out / 'data/captions.json'}", f"training.output_dir={out / 'stage1'}"]
    return [
        *common,
        f"data.path={out / 'data/instruct.json'}",
        f"training.output_dir={out / 'stage2'}",
        f"model.projector_from={out / 'stage1'}",
    ]


def prepare(out: Path, n_train: int = 600, n_test: int = 100) -> dict[str, Path]:
    """Write the tiny parts and the synthetic data under `out`."""
    from lvit import synthetic
    from lvit.tiny import build_tiny_parts

    build_tiny_parts(out / "parts", corpus=synthetic.corpus())
    return synthetic.write_shapes_data(out / "data", n_train=n_train, n_test=n_test)


def evaluate(run_dir: Path, test_path: Path, image_folder: Path) -> dict[str, float]:
    """Exact-match accuracy of a run on held-out records, overall and per question kind."""
    from lvit.data.images import ImageLoader
    from lvit.data.records import normalise
    from lvit.generate import generate_answers
    from lvit.model import num_image_tokens
    from lvit.runs import load_trained
    from lvit.templates import Conversation, ConversationEncoder

    # A full fine-tune loads with plain `LlavaForConditionalGeneration.from_pretrained`; adapter runs
    # are rebuilt as they trained (base + adapter).
    model, processor, run = load_trained(run_dir)
    config = model.config
    encoder = ConversationEncoder(
        run.recipe.data.template, processor.tokenizer, config.image_token_id, num_image_tokens(config.vision_config)
    )
    records = [normalise(r, i) for i, r in enumerate(json.loads(test_path.read_text()))]
    convs = [Conversation(turns=r.conversation.turns[:1], has_image=r.image is not None) for r in records]
    answers = generate_answers(
        model,
        encoder,
        ImageLoader(processor.image_processor, image_folder),
        convs,
        [r.image for r in records],
        max_new_tokens=6,
    )
    per_kind: dict[str, list[bool]] = {}
    for record, answer in zip(records, answers, strict=True):
        kind = record.id.rsplit("-", 1)[-1]
        per_kind.setdefault(kind, []).append(answer.strip().lower() == record.conversation.turns[1][1].lower())
    scores = {kind: sum(v) / len(v) for kind, v in per_kind.items()}
    scores["all"] = sum(sum(v) for v in per_kind.values()) / len(records)
    return scores


def run_demo(out: Path, overwrite: bool = False) -> dict[str, float]:
    from lvit import synthetic
    from lvit.recipe import load_recipe
    from lvit.train import run

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LvitError(
                f"{out} exists and is not empty; pass --overwrite to replace it or --out for another folder."
            )
        shutil.rmtree(out)
    if not (RECIPES / "tiny_stage1.yaml").is_file():
        raise LvitError(f"the demo recipes are not at {RECIPES}; run lvit from a checkout (pip install -e .).")
    start = time.time()
    typer.echo(f"[1/4] building a tiny CLIP + Llama and a synthetic dataset under {out}")
    paths = prepare(out)
    typer.echo("[2/4] stage 1 (align): only the projector trains, recipes/tiny_stage1.yaml")
    stage1 = run(load_recipe(RECIPES / "tiny_stage1.yaml", demo_overrides(out, 1)))
    typer.echo("[3/4] stage 2 (finetune): projector + LM train, recipes/tiny_stage2.yaml")
    stage2 = run(load_recipe(RECIPES / "tiny_stage2.yaml", demo_overrides(out, 2)))
    typer.echo("[4/4] held-out accuracy (images never trained on), model loaded with plain transformers")
    scores = evaluate(stage2, paths["test"], paths["images"])
    losses = {
        name: json.loads((d / "lvit_run.json").read_text())["metrics"].get("train_loss")
        for name, d in (("stage 1", stage1), ("stage 2", stage2))
    }
    typer.echo("")
    for name, loss in losses.items():
        typer.echo(f"  {name} mean training loss: {loss:.3f}")
    for kind, acc in sorted(scores.items()):
        typer.echo(f"  held-out accuracy ({kind}): {acc:.1%}   chance: {synthetic.CHANCE:.0%}")
    typer.echo(f"  wall time: {time.time() - start:.0f} s; run folders: {stage1}, {stage2}")
    (out / "demo_results.json").write_text(
        json.dumps({"accuracy": scores, "chance": synthetic.CHANCE, "train_loss": losses}, indent=2)
    )
    return scores
