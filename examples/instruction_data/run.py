"""Captioned images -> instruction data -> a fine-tuned model -> its LLaVA-Bench-style score (CPU, offline).

    python examples/instruction_data/run.py [--work runs/instruction_data]
        [--base-url URL --model NAME [--api-key-env VAR]] [--steps 30]

1. (stand-in for your data) a folder of photos, each with its captions in NAME.txt; some held out;
2. `make_input.py`: the folder -> the JSON Lines input of `lvit data generate`;
3. `lvit data generate`: a text-only LLM writes conversations, descriptions and reasoning questions from the
   captions (the LLaVA paper's data engine); the same on the held-out photos gives reference answers;
4. `lvit data check`: the generated data is valid training data;
5. `lvit finetune recipes/tiny_stage2.yaml` on it (the tiny demo model, a few steps);
6. `lvit eval llava-bench`: the fine-tuned model answers the held-out questions and the LLM judges its answers
   against the references (score relative to the reference, x100, per kind).

Without --base-url, a stand-in LLM (`stand_in_llm.py`: fixed rules, no understanding) answers on 127.0.0.1,
so the example runs anywhere. With your endpoint (vLLM, SGLang, Ollama, transformers serve, a hosted API),
the same commands make real data; use your own base models in the recipe for a real model.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LVIT = [sys.executable, "-m", "lvit"]
KIND_TO_CATEGORY = {"conversation": "conv", "detail": "detail", "complex": "complex"}  # LLaVA-Bench's names


def step(title: str, cmd: list) -> subprocess.CompletedProcess:
    shown = " ".join(shlex.quote(str(c)) for c in (["lvit", *cmd[3:]] if cmd[:3] == LVIT else cmd))
    print(f"\n=== {title}\n$ {shown}", flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, text=True, capture_output=True)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        raise SystemExit(f"step failed ({title}): exit status {result.returncode}")
    return result


def make_your_photos(folder: Path, n: int, seed: int = 0) -> None:
    """What a team brings: photos, each with a caption file beside it."""
    from lvit.demo.synthetic import PLACES, SHAPES, draw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour, place, shape = ("red", "green", "blue", "yellow")[i % 4], PLACES[(i // 4) % 4], rng.choice(SHAPES)
        draw(colour, place, shape, 32, rng).save(folder / f"photo_{i:03d}.png")
        where = "at the top" if place == "top" else "at the bottom" if place == "bottom" else f"on the {place}"
        (folder / f"photo_{i:03d}.txt").write_text(
            f"A {colour} {shape} {where} of the picture.\nA small {colour} {shape} on a light background.\n"
        )


def start_stand_in() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, HERE / "stand_in_llm.py", "--port", str(port)], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=1):
                break  # it answers
        except OSError:
            time.sleep(0.1)
    return proc, base


def bench_files(records: Path, captions: Path, folder: Path) -> list[Path]:
    """Generated held-out records -> LLaVA-Bench's layout: questions, context, reference answers."""
    caps = {json.loads(line)["image"]: json.loads(line)["captions"] for line in captions.read_text().splitlines()}
    questions, references = [], []
    for qid, line in enumerate(records.read_text().splitlines()):
        rec = json.loads(line)
        text = rec["conversations"][0]["value"].replace("<image>\n", "")
        questions.append(
            {"question_id": qid, "image": rec["image"], "text": text, "category": KIND_TO_CATEGORY[rec["kind"]]}
        )
        references.append({"question_id": qid, "text": rec["conversations"][1]["value"]})
    context = [{"image": image, "caption": c} for image, c in caps.items()]
    paths = [folder / "questions.jsonl", folder / "context.jsonl", folder / "answers_gpt4.jsonl"]
    for path, rows in zip(paths, (questions, context, references), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "instruction_data")
    parser.add_argument("--base-url", help="Your OpenAI-compatible endpoint (default: the stand-in LLM).")
    parser.add_argument("--model", default="stand-in", help="The model name your endpoint serves.")
    parser.add_argument("--api-key-env", help="The environment variable holding your endpoint's key.")
    parser.add_argument("--photos", type=int, default=24, help="How many training photos (8 more are held out).")
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps (the point is the workflow).")
    args = parser.parse_args()
    work = args.work.resolve()
    if (work / "run").exists():
        raise SystemExit(f"{work / 'run'} exists; pass another --work (lvit never overwrites a run)")

    stand_in = None
    if args.base_url is None:
        stand_in, args.base_url = start_stand_in()
        print(f"=== no --base-url: a stand-in LLM (fixed rules) answers at {args.base_url}", flush=True)
    endpoint = ["--base-url", args.base_url, "--model", args.model]
    endpoint += ["--api-key-env", args.api_key_env] if args.api_key_env else []
    try:
        print(f"\n=== 0. the tiny demo model (a CLIP and a Llama built from configs) -> {work / 'parts'}", flush=True)
        from lvit.demo.run import synthetic
        from lvit.demo.tiny import build_tiny_parts

        vision, lm = build_tiny_parts(work / "parts", corpus=synthetic.corpus())

        print("\n=== 1. your data: photos with their captions (NAME.png + NAME.txt)", flush=True)
        make_your_photos(work / "photos", args.photos)
        make_your_photos(work / "heldout", 8, seed=1)

        train_in, held_in = work / "captions.jsonl", work / "heldout_captions.jsonl"
        step(
            "2. captioned photos -> generate's input",
            [sys.executable, HERE / "make_input.py", work / "photos", train_in],
        )
        step(
            "2b. the same for the held-out photos", [sys.executable, HERE / "make_input.py", work / "heldout", held_in]
        )

        data = work / "instruct.jsonl"
        step(
            "3. instruction data from the captions (the paper's mix of kinds, 3 records per photo)",
            [*LVIT, "data", "generate", train_in, "--image-folder", work / "photos", "--out", data, *endpoint,
             "--records", str(3 * args.photos)],
        )  # fmt: skip
        held = work / "heldout_instruct.jsonl"
        step(
            "3b. reference answers for held-out questions (the same engine, 2 per photo)",
            [*LVIT, "data", "generate", held_in, "--image-folder", work / "heldout", "--out", held, *endpoint,
             "--records", "16"],
        )  # fmt: skip

        step("4. check the generated data", [*LVIT, "data", "check", data, "--image-folder", work / "photos"])

        overrides = [
            f"model.vision_tower={vision}",
            f"model.language_model={lm}",
            "model.projector_from=null",  # no stage-1 projector here; a real run starts from one
            f"data.path={data}",
            f"data.image_folder={work / 'photos'}",
            "data.max_length=512",
            f"training.output_dir={work / 'run'}",
            f"training.max_steps={args.steps}",
            "training.per_device_train_batch_size=8",
            "global_batch_size=8",
            "training.logging_steps=10",
        ]
        step(
            "5. fine-tune on it (recipes/tiny_stage2.yaml + overrides)", [*LVIT, "finetune", "tiny_stage2", *overrides]
        )

        questions, context, references = bench_files(held, held_in, work)
        step(
            "6. score the model: it answers the held-out questions, the LLM judges against the references",
            [*LVIT, "eval", "llava-bench", work / "run", "--questions", questions, "--context", context,
             "--references", references, "--image-folder", work / "heldout", "--out", work / "bench",
             "--max-new-tokens", "48", *endpoint],
        )  # fmt: skip
        print(f"\ndone: data {data}, run {work / 'run'}, reviews {work / 'bench' / 'reviews.jsonl'}")
    finally:
        if stand_in is not None:
            stand_in.terminate()
            stand_in.wait()


if __name__ == "__main__":
    main()
