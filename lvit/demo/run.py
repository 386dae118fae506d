"""`lvit demo`: a tiny LLaVA trained end to end, offline, through the same recipes as real runs.

1. Builds a tiny CLIP and a tiny Llama (with a locally trained tokenizer) and saves them as
   Hugging Face folders; the runs load them back with `from_pretrained`.
2. Writes a synthetic image-instruction dataset (LLaVA JSON + PNG files).
3. Runs `recipes/tiny_stage1.yaml` (align) then `recipes/tiny_stage2.yaml` (finetune) with
   `lvit.train.run`, exactly what `lvit finetune` does.
4. Answers the held-out questions with the stage-2 run; reports exact-match accuracy beside chance.
5. With `--ablation`: also stage 2 without stage 1 (a fresh projector, the same stage-2 budget),
   the paper's first ablation in miniature; both accuracies are reported.
6. With `--quick`: a few records and training steps (seconds, not minutes), to see it run; it does
   not learn the task.

Progress goes to the "lvit" logger; `run_demo` returns the results and the CLI prints the summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from lvit.demo import synthetic
from lvit.demo.synthetic import question_kind
from lvit.demo.tiny import build_tiny_parts
from lvit.errors import LvitError
from lvit.infer.answers import exact_match, generate_file
from lvit.infer.generation import GenerationSettings
from lvit.infer.load import load_model
from lvit.infer.questions import read_questions
from lvit.recipe.catalog import RECIPES_DIR as RECIPES
from lvit.recipe.load import load_recipe
from lvit.train.run import run

log = logging.getLogger(__name__)

# --quick: records (train, test) and training steps (stage 1, stage 2)
QUICK_DATA = (32, 8)
QUICK_STEPS = (2, 4)


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

    build_tiny_parts(out / "parts", corpus=synthetic.corpus())
    return synthetic.write_shapes_data(out / "data", n_train=n_train, n_test=n_test)


def evaluate(run_dir: Path, test_path: Path, image_folder: Path) -> dict[str, float]:
    """Exact-match accuracy of a run on held-out questions, overall and per question kind.

    The answers are written to `<run_dir>/eval/heldout-answers.jsonl` (the format `lvit generate` writes).
    """

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


def run_demo(out: Path, overwrite: bool = False, ablation: bool = False, quick: bool = False) -> dict:
    """The demo; with `ablation`, also stage 2 without stage 1 (the paper's first ablation in miniature).

    With `quick`, a few records and training steps (seconds; the model does not learn the task).
    Returns what `demo_results.json` holds ("accuracy": held-out accuracy of the two-stage model per
    question kind and "all", "chance", "train_loss" per run, and with `ablation` "ablation"), plus
    "runs" (run name -> folder) and "wall_time_s".
    """

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LvitError(
                f"{out} exists and is not empty; pass --overwrite to replace it or --out for another folder."
            )
        shutil.rmtree(out)
    if not (RECIPES / "tiny_stage1.yaml").is_file():
        raise LvitError(f"the demo recipes are not at {RECIPES}; reinstall lvit (`pip install .` in a checkout).")
    start = time.time()
    n = 5 if ablation else 4
    steps = [[], []]
    if quick:
        steps = [[f"training.max_steps={k}"] for k in QUICK_STEPS]
    log.info("[1/%d] building a tiny CLIP + Llama and a synthetic dataset under %s", n, out)
    paths = prepare(out, *QUICK_DATA) if quick else prepare(out)
    log.info("[2/%d] stage 1 (align): only the projector trains, recipes/tiny_stage1.yaml", n)
    stage1 = run(load_recipe(RECIPES / "tiny_stage1.yaml", [*demo_overrides(out, 1), *steps[0]]))
    log.info("[3/%d] stage 2 (finetune): projector + LM train, recipes/tiny_stage2.yaml", n)
    stage2 = run(load_recipe(RECIPES / "tiny_stage2.yaml", [*demo_overrides(out, 2), *steps[1]]))
    log.info("[4/%d] held-out accuracy (images never trained on)", n)
    scores = evaluate(stage2, paths["test"], paths["images"])
    runs = {"stage 1": stage1, "stage 2": stage2}
    results: dict = {"accuracy": scores, "chance": synthetic.CHANCE}
    if ablation:
        log.info("[5/%d] ablation: stage 2 without stage 1 (a fresh projector, the same stage-2 recipe and budget)", n)
        no_stage1 = run(load_recipe(RECIPES / "tiny_stage2.yaml", [*ablation_overrides(out), *steps[1]]))
        runs["stage 2 without stage 1"] = no_stage1
        results["ablation"] = {"accuracy": evaluate(no_stage1, paths["test"], paths["images"])}
    results["train_loss"] = {
        name: json.loads((d / "lvit_run.json").read_text())["metrics"].get("train_loss") for name, d in runs.items()
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    return {**results, "runs": runs, "wall_time_s": time.time() - start}


def format_summary(results: dict) -> str:
    """The lines `lvit demo` prints after a run, from `run_demo`'s result."""
    lines = [""]
    for name, loss in results["train_loss"].items():
        lines.append(f"  {name} mean training loss: {loss:.3f}")
    for kind, acc in sorted(results["accuracy"].items()):
        lines.append(f"  held-out accuracy ({kind}): {acc:.1%}   chance: {results['chance']:.0%}")
    if "ablation" in results:
        lines.append("  ablation, held-out accuracy:")
        pairs = (
            ("stage 1 + stage 2", results["accuracy"]),
            ("stage 2 without stage 1", results["ablation"]["accuracy"]),
        )
        for name, acc in pairs:
            lines.append(f"    {name:<24} {acc['all']:.1%} (colour {acc['colour']:.1%}, place {acc['place']:.1%})")
    folders = ", ".join(str(d) for d in results["runs"].values())
    lines.append(f"  wall time: {results['wall_time_s']:.0f} s; run folders: {folders}")
    return "\n".join(lines)
