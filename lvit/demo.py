"""`lvit demo`: a tiny LLaVA trained end to end, offline, through the same recipes as real runs.

1. Builds a tiny CLIP and a tiny Llama (with a locally trained tokenizer) and saves them as
   Hugging Face folders; the runs load them back with `from_pretrained`.
2. Writes a synthetic image-instruction dataset (LLaVA JSON + PNG files).
3. Runs `recipes/tiny_stage1.yaml` (align) then `recipes/tiny_stage2.yaml` (finetune) with
   `lvit.train.run`, exactly what `lvit finetune` does.
4. Answers the held-out questions with the stage-2 run; reports exact-match accuracy beside chance.
5. With `--ablation`: also stage 2 without stage 1 (a fresh projector, the same stage-2 budget),
   the paper's first ablation in miniature; both accuracies are printed.
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
    """Exact-match accuracy of a run on held-out questions, overall and per question kind.

    The answers are written to `<run_dir>/eval/heldout-answers.jsonl` (the format `lvit generate` writes).
    """
    from lvit.answers import generate_file
    from lvit.eval import exact_match
    from lvit.generation import GenerationSettings
    from lvit.questions import read_questions
    from lvit.runs import load_model
    from lvit.synthetic import question_kind

    # A full fine-tune loads with plain `LlavaForConditionalGeneration.from_pretrained`; adapter runs
    # are rebuilt as they trained (base + adapter).
    loaded = load_model(run_dir, device="cpu")
    questions = read_questions(test_path)
    answers = Path(run_dir) / "eval" / "heldout-answers.jsonl"
    answers.unlink(missing_ok=True)  # always a fresh measurement
    rows = generate_file(
        loaded, questions, answers, image_folder, GenerationSettings(max_new_tokens=6), batch_size=16, progress=False
    )
    per_kind: dict[str, list[dict]] = {}
    for q in questions:
        per_kind.setdefault(question_kind(q.id), []).append(rows[q.id])
    scores = {kind: exact_match(kind_rows)["accuracy"] for kind, kind_rows in per_kind.items()}
    scores["all"] = exact_match([rows[q.id] for q in questions])["accuracy"]
    return scores


def ablation_overrides(out: Path) -> list[str]:
    """Stage 2 as in the demo, but from a freshly initialised projector (no stage 1)."""
    return [*demo_overrides(out, 2), f"training.output_dir={out / 'stage2-no-stage1'}", "model.projector_from=null"]


def run_demo(out: Path, overwrite: bool = False, ablation: bool = False) -> dict[str, float]:
    """The demo; with `ablation`, also stage 2 without stage 1 (the paper's first ablation in miniature).

    Returns the held-out accuracies of the two-stage model; `demo_results.json` also holds the
    ablation's under "ablation".
    """
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
    n = 5 if ablation else 4
    typer.echo(f"[1/{n}] building a tiny CLIP + Llama and a synthetic dataset under {out}")
    paths = prepare(out)
    typer.echo(f"[2/{n}] stage 1 (align): only the projector trains, recipes/tiny_stage1.yaml")
    stage1 = run(load_recipe(RECIPES / "tiny_stage1.yaml", demo_overrides(out, 1)))
    typer.echo(f"[3/{n}] stage 2 (finetune): projector + LM train, recipes/tiny_stage2.yaml")
    stage2 = run(load_recipe(RECIPES / "tiny_stage2.yaml", demo_overrides(out, 2)))
    typer.echo(f"[4/{n}] held-out accuracy (images never trained on)")
    scores = evaluate(stage2, paths["test"], paths["images"])
    runs = {"stage 1": stage1, "stage 2": stage2}
    results: dict = {"accuracy": scores, "chance": synthetic.CHANCE}
    if ablation:
        typer.echo(f"[5/{n}] ablation: stage 2 without stage 1 (a fresh projector, the same stage-2 recipe and budget)")
        no_stage1 = run(load_recipe(RECIPES / "tiny_stage2.yaml", ablation_overrides(out)))
        runs["stage 2 without stage 1"] = no_stage1
        results["ablation"] = {"accuracy": evaluate(no_stage1, paths["test"], paths["images"])}
    losses = {
        name: json.loads((d / "lvit_run.json").read_text())["metrics"].get("train_loss") for name, d in runs.items()
    }
    results["train_loss"] = losses
    typer.echo("")
    for name, loss in losses.items():
        typer.echo(f"  {name} mean training loss: {loss:.3f}")
    for kind, acc in sorted(scores.items()):
        typer.echo(f"  held-out accuracy ({kind}): {acc:.1%}   chance: {synthetic.CHANCE:.0%}")
    if ablation:
        typer.echo("  ablation, held-out accuracy:")
        for name, acc in (("stage 1 + stage 2", scores), ("stage 2 without stage 1", results["ablation"]["accuracy"])):
            typer.echo(f"    {name:<24} {acc['all']:.1%} (colour {acc['colour']:.1%}, place {acc['place']:.1%})")
    typer.echo(f"  wall time: {time.time() - start:.0f} s; run folders: {', '.join(str(d) for d in runs.values())}")
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    return scores
