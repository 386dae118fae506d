"""Bring your own data, end to end, on the tiny demo model (CPU, a few minutes, offline).

    python examples/custom_dataset/run.py [--work runs/custom_dataset] [--steps 40]

1. (stand-in for your data) a folder of photos and `questions.csv` with `image,question,answer` rows;
   one row names a photo that is not in the folder, as happens with real data;
2. `make_jsonl.py`: the CSV -> LLaVA JSON Lines (`data.jsonl`);
3. `lvit data check`: every problem with its record, and the sequence lengths under the recipe;
4. `lvit finetune recipes/tiny_stage2_qlora.yaml` with overrides: QLoRA on the tiny model, skipping
   the bad record (`data.on_bad_record=skip`, listed in the run's `skipped_records.jsonl`);
5. `lvit export`: a stock LLaVA folder, adapters merged;
6. a question to the exported model with plain transformers (no lvit).

Each step is the command you would type; they are printed before they run. With your own data, start
at step 2 with your CSV and image folder, and use your own base models in the recipe.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LVIT = [sys.executable, "-m", "lvit"]


def step(title: str, cmd: list[str], ok_codes=(0,)) -> subprocess.CompletedProcess:
    shown = " ".join(shlex.quote(str(c)) for c in (["lvit", *cmd[3:]] if cmd[:3] == LVIT else cmd))
    print(f"\n=== {title}\n$ {shown}", flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, text=True, capture_output=True)
    print(result.stdout, end="", flush=True)
    if result.returncode not in ok_codes:
        print(result.stderr, file=sys.stderr)
        raise SystemExit(f"step failed ({title}): exit status {result.returncode}")
    return result


def make_your_data(folder: Path, n_images: int, seed: int = 0) -> Path:
    """What a team brings: photos in a folder and a CSV of questions about them."""
    from lvit.demo.synthetic import PLACES, QUESTIONS, SHAPES, draw

    colours = ["red", "green", "blue", "yellow"]
    rng = random.Random(seed)
    photos = folder / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    rows = ["image,question,answer"]
    for i in range(n_images):
        colour, place = colours[i % 4], PLACES[(i // 4) % 4]
        name = f"shape_{i:03d}.png"
        draw(colour, place, rng.choice(SHAPES), 32, rng).save(photos / name)
        rows += [f"{name},{QUESTIONS['colour']},{colour}", f"{name},{QUESTIONS['place']},{place}"]
    rows.append(f"shape_{n_images:03d}.png,{QUESTIONS['colour']},red")  # a photo missing from the folder
    csv_path = folder / "questions.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def ask(export_dir: Path, image_path: Path, question: str) -> str:
    """Plain transformers: the exported folder is a stock LLaVA checkpoint with its processor."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(export_dir)
    model = LlavaForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages)  # ends with " ASSISTANT:", the trained template
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "custom_dataset")
    parser.add_argument("--images", type=int, default=16, help="How many photos the stand-in data has.")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps (the point is the workflow).")
    args = parser.parse_args()
    work = args.work.resolve()
    if (work / "run").exists():
        raise SystemExit(f"{work / 'run'} exists; pass another --work (lvit never overwrites a run)")

    print(f"=== 0. the tiny demo model (a CLIP and a Llama built from configs) -> {work / 'parts'}", flush=True)
    from lvit.demo.run import synthetic
    from lvit.demo.tiny import build_tiny_parts

    vision, lm = build_tiny_parts(work / "parts", corpus=synthetic.corpus())

    print("\n=== 1. your data: a folder of photos and a CSV (image,question,answer)", flush=True)
    csv_path = make_your_data(work, args.images)
    print(f"{csv_path} ({sum(1 for _ in csv_path.open()) - 1} rows), photos in {work / 'photos'}")

    data = work / "data.jsonl"
    step("2. CSV -> LLaVA JSON Lines", [sys.executable, HERE / "make_jsonl.py", csv_path, data])

    recipe = REPO / "recipes" / "tiny_stage2_qlora.yaml"
    overrides = [
        f"model.vision_tower={vision}",
        f"model.language_model={lm}",
        "model.projector_from=null",  # no stage-1 projector here; a real run starts from one
        f"data.path={data}",
        f"data.image_folder={work / 'photos'}",
        "data.on_bad_record=skip",  # train on the good records, list the others in skipped_records.jsonl
        f"training.output_dir={work / 'run'}",
        f"training.max_steps={args.steps}",
        "training.per_device_train_batch_size=8",
        "global_batch_size=8",
        "training.logging_steps=4",
    ]
    check = step(
        "3. check the data (exit status 1: it has an error)",
        [*LVIT, "data", "check", data, "--image-folder", work / "photos", "--recipe", recipe]
        + [a for o in overrides if o.startswith("model.") for a in ("-o", o)],
        ok_codes=(0, 1),
    )
    if "image_missing" not in check.stdout:
        raise SystemExit("the check should have reported the missing photo")

    step(
        "4. fine-tune with QLoRA (recipes/tiny_stage2_qlora.yaml + overrides)", [*LVIT, "finetune", recipe, *overrides]
    )
    skipped = [json.loads(line) for line in (work / "run" / "skipped_records.jsonl").read_text().splitlines()]
    print(f"skipped, with reasons, in {work / 'run' / 'skipped_records.jsonl'}:")
    for row in skipped:
        print(f"  {row['id']} ({row['kind']}): {row['reason']}")

    step(
        "5. export a stock LLaVA folder (LoRA merged into the dequantized base)",
        [*LVIT, "export", work / "run", "--out", work / "export", "--dtype", "fp32"],
    )

    print("\n=== 6. ask the exported model a question, with plain transformers", flush=True)
    question = synthetic.QUESTIONS["colour"]
    answer = ask(work / "export", work / "photos" / "shape_000.png", question)
    print(
        f"Q: {question}\nanswer: {answer!r}   (the shape is red; a few QLoRA steps on a random tiny LM rarely say so)"
    )
    print(f"\ndone: data {data}, run {work / 'run'}, export {work / 'export'}")


if __name__ == "__main__":
    main()
