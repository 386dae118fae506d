"""Check that an lvit export (a stock `LlavaForConditionalGeneration` or `LlavaNextForConditionalGeneration` folder)
gives the same prompt and greedy tokens under another transformers release (e.g. the last 4.x) as under the one lvit
uses (5.x).

`run` loads the export in THIS interpreter with AutoProcessor + the class its config names (fp32, CPU), builds
the prompt with `processor.apply_chat_template` (one image + a question, add_generation_prompt=True), generates
16 greedy tokens with eos disabled (generation_config.eos_token_id = None, so all 16 are produced), and prints JSON:
transformers_version, prompt_ids, tokens, top_logits (the chosen token's logit at each step), info (classes loaded,
rope_theta read, missing/unexpected weights) and errors (stage: message; a failed stage stops the run).
`compare` reads two such JSON files; `both` runs `run` under two interpreters and compares. Exit 0 when equal.

    python scripts/check_older_transformers.py run EXPORT [--image IMG.png] > out.json
    python scripts/check_older_transformers.py compare A.json B.json
    python scripts/check_older_transformers.py both EXPORT --python-a .venv/bin/python --python-b /tmp/tf4/bin/python

Without --image a fixed 32x32 RGB gradient is used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback

QUESTION = "What shape is in the image?"
NEW_TOKENS = 16


def make_image(path: str | None):
    from PIL import Image

    if path:
        return Image.open(path).convert("RGB")
    image = Image.new("RGB", (32, 32))
    image.putdata([(8 * x, 8 * y, 255 - 4 * (x + y)) for y in range(32) for x in range(32)])
    return image


def run(export: str, image_path: str | None) -> dict:
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    out: dict = dict(transformers_version=transformers.__version__, prompt_ids=None, tokens=None, top_logits=None)
    out.update(info={}, errors=[])
    stage = "processor"
    try:
        processor = AutoProcessor.from_pretrained(export)
        out["info"]["processor"] = type(processor).__name__
        out["info"]["tokenizer"] = type(getattr(processor, "tokenizer", None)).__name__
        out["info"]["image_processor"] = type(getattr(processor, "image_processor", None)).__name__
        stage = "model"
        # `dtype=` is understood from transformers 4.56 on (older: torch_dtype=)
        model_type = AutoConfig.from_pretrained(export).model_type
        model_class = LlavaNextForConditionalGeneration if model_type == "llava_next" else LlavaForConditionalGeneration
        out["info"]["model_class"] = model_class.__name__
        model, loading = model_class.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
        model.eval()
        text = model.config.text_config
        rope = getattr(text, "rope_parameters", None) or {}
        out["info"]["rope_theta"] = getattr(text, "rope_theta", None) or rope.get("rope_theta")
        out["info"]["dtype"] = str(model.dtype)
        # a weight the release cannot place is only warned about (and left random): count them, show 3
        out["info"]["loading"] = {k: [len(v), sorted(v)[:3]] for k, v in loading.items() if k.endswith("_keys") and v}
        stage = "chat_template"
        content = [{"type": "image", "image": make_image(image_path)}, {"type": "text", "text": QUESTION}]
        messages = [{"role": "user", "content": content}]
        out["info"]["prompt_text"] = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
        inputs = processor.apply_chat_template(messages, **kwargs)
        out["prompt_ids"] = inputs["input_ids"][0].tolist()
        pixels = inputs["pixel_values"]
        out["info"]["pixel_values"] = [list(pixels.shape), round(pixels.sum().item(), 3)]
        stage = "generate"
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            gen = model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        out["tokens"] = gen.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        out["top_logits"] = [round(step[0].max().item(), 5) for step in gen.logits]
        out["info"]["text"] = processor.decode(out["tokens"])
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        out["errors"].append({"stage": stage, "error": f"{type(exc).__name__}: {exc}", "where": lines[-2].strip()})
    return out


def compare(a: dict, b: dict) -> bool:
    same_prompt = a["prompt_ids"] is not None and a["prompt_ids"] == b["prompt_ids"]
    same_tokens = a["tokens"] is not None and a["tokens"] == b["tokens"]
    diff = None
    if a["top_logits"] and b["top_logits"]:
        diff = max(abs(x - y) for x, y in zip(a["top_logits"], b["top_logits"], strict=True))
    print(f"A: transformers {a['transformers_version']}  errors: {a['errors'] or 'none'}")
    print(f"B: transformers {b['transformers_version']}  errors: {b['errors'] or 'none'}")
    print(f"prompt ids equal: {same_prompt}  (lengths {len(a['prompt_ids'] or [])}, {len(b['prompt_ids'] or [])})")
    print(f"greedy tokens equal: {same_tokens}  (A {a['tokens']}, B {b['tokens']})")
    print(f"max |chosen logit A - B|: {diff}")
    for key in sorted(set(a["info"]) | set(b["info"])) if not (a["errors"] or b["errors"]) else []:
        if a["info"].get(key) != b["info"].get(key):
            print(f"info differs: {key}: A={a['info'].get(key)!r} B={b['info'].get(key)!r}")
    return same_prompt and same_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p_run = sub.add_parser("run", help="load, prompt, generate in this interpreter; print JSON")
    p_run.add_argument("export")
    p_run.add_argument("--image")
    p_cmp = sub.add_parser("compare", help="compare two `run` JSON files")
    p_cmp.add_argument("a")
    p_cmp.add_argument("b")
    p_both = sub.add_parser("both", help="run under two interpreters and compare")
    p_both.add_argument("export")
    p_both.add_argument("--image")
    p_both.add_argument("--python-a", default=sys.executable)
    p_both.add_argument("--python-b", required=True)
    args = parser.parse_args()
    if args.mode == "run":
        result = run(args.export, args.image)
        print(json.dumps(result))
        return 1 if result["errors"] else 0
    if args.mode == "compare":
        with open(args.a) as fa, open(args.b) as fb:
            return 0 if compare(json.load(fa), json.load(fb)) else 1
    results = []
    for python in (args.python_a, args.python_b):
        cmd = [python, __file__, "run", args.export] + (["--image", args.image] if args.image else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if not done.stdout.strip():
            print(f"{python} printed nothing:\n{done.stderr[-3000:]}")
            return 2
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return 0 if compare(*results) else 1


if __name__ == "__main__":
    sys.exit(main())
