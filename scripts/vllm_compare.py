"""Compare greedy generation of an lvit export under transformers and under vLLM (GPU machine, both installed).

Written against vLLM 0.34.0 (commit 62d4bc3c7; it pins transformers>=5.16.1,<5.23, so the transformers side runs
with that release here). For each prompt (one image + one question) it:

- transformers: AutoProcessor + LlavaForConditionalGeneration (the chosen dtype, cuda),
  `processor.apply_chat_template(..., tokenize=True)` and `generate(do_sample=False)`;
- vLLM: `LLM(model=EXPORT, dtype=..., limit_mm_per_prompt={"image": 1})` and `LLM.chat` with the same
  messages (the image as an `image_pil` part), `SamplingParams(temperature=0, max_tokens=N)`.

It prints JSON: per prompt, whether the prompt ids match (vLLM's prompt ids with `<image>` already expanded,
against the transformers input_ids), both token lists, equal or the first differing position. Exit 0 when every
prompt has equal prompt ids and equal tokens. By default eos is ignored on both sides (exactly N tokens each);
--eos keeps each stack's own stopping (transformers: generation_config.eos_token_id; vLLM: the tokenizer's
eos_token_id plus generation_config.json's eos_token_id).

    python scripts/vllm_compare.py EXPORT                       # the export's synthetic image + question
    python scripts/vllm_compare.py EXPORT --prompts prompts.json --max-tokens 32 --dtype float32

prompts.json: [{"image": "a.jpg", "question": "What is in the picture?"}, ...] (paths relative to the file).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

try:  # the same image and question as lvit's export self-check, when lvit imports here
    from lvit.export.selfcheck import SYNTHETIC_QUESTION, synthetic_image
except Exception:  # noqa: BLE001 - lvit needs transformers>=5.24, vLLM 0.34 pins <5.23
    SYNTHETIC_QUESTION = "What is in the picture?"

    def synthetic_image(size: int = 224):
        from PIL import Image, ImageDraw

        size = max(size, 16)
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).rectangle([size // 8, size // 8, size // 2, size // 2], fill="red")
        return image


def load_prompts(export: str, path: str | None, n: int) -> list[tuple[str, object, str]]:
    """(label, PIL image, question) for each prompt: from the JSON file, else the synthetic image."""
    from PIL import Image
    from transformers import AutoConfig

    if path is None:
        size = AutoConfig.from_pretrained(export).vision_config.image_size
        return [("synthetic", synthetic_image(size), SYNTHETIC_QUESTION)]
    base = Path(path).parent
    items = json.loads(Path(path).read_text())[:n]
    return [(it["image"], Image.open(base / it["image"]).convert("RGB"), it["question"]) for it in items]


def messages(image, question: str, vllm: bool) -> list[dict]:
    part = {"type": "image_pil", "image_pil": image} if vllm else {"type": "image", "image": image}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def run_transformers(export: str, prompts, dtype, max_tokens: int, eos: bool) -> tuple[list[dict], object]:
    import torch
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(export)
    model = LlavaForConditionalGeneration.from_pretrained(export, dtype=dtype).to("cuda").eval()
    # generate() fills every unset value from model.generation_config (repetition_penalty, eos, ...), so replace it
    # with a bare one: plain greedy like vLLM's SamplingParams(temperature=0), eos only with --eos.
    stock = model.generation_config
    first_eos = stock.eos_token_id[0] if isinstance(stock.eos_token_id, list) else stock.eos_token_id
    pad = stock.pad_token_id if stock.pad_token_id is not None else first_eos
    eos_ids = stock.eos_token_id if eos else None
    model.generation_config = GenerationConfig(bos_token_id=stock.bos_token_id, pad_token_id=pad, eos_token_id=eos_ids)
    template = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    out = []
    for _, image, question in prompts:
        inputs = processor.apply_chat_template(messages(image, question, vllm=False), **template).to("cuda")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        tokens = seq[0, inputs["input_ids"].shape[1] :].tolist()
        text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
        out.append(dict(prompt_ids=inputs["input_ids"][0].tolist(), tokens=tokens, text=text))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out, stock.eos_token_id


def run_vllm(export: str, prompts, args) -> list[dict]:
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    text = AutoConfig.from_pretrained(export).text_config
    max_len = min(args.max_model_len, getattr(text, "max_position_embeddings", None) or args.max_model_len)
    engine = dict(dtype=args.dtype, max_model_len=max_len, limit_mm_per_prompt={"image": 1}, seed=0)
    llm = LLM(model=export, gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=True, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=not args.eos)
    outs = llm.chat([messages(image, q, vllm=True) for _, image, q in prompts], params, use_tqdm=False)
    return [
        dict(prompt_ids=list(o.prompt_token_ids or []), tokens=list(c.token_ids), text=c.text, finish=c.finish_reason)
        for o in outs
        for c in o.outputs[:1]
    ]


def first_diff(a: list[int], b: list[int]) -> int | None:
    """The first position where a and b differ (a length difference counts), None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export")
    ap.add_argument("--prompts", help="JSON list of {image, question}; default: the synthetic image")
    ap.add_argument("-n", type=int, default=8, help="use the first N prompts of --prompts")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--eos", action="store_true", help="stop at eos (default: ignore eos, N tokens each)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = ap.parse_args()

    import torch
    import transformers
    import vllm

    prompts = load_prompts(args.export, args.prompts, args.n)
    hf, hf_eos = run_transformers(args.export, prompts, getattr(torch, args.dtype), args.max_tokens, args.eos)
    vl = run_vllm(args.export, prompts, args)
    rows = []
    for (label, _, question), h, v in zip(prompts, hf, vl, strict=True):
        diff, prompt_diff = first_diff(h["tokens"], v["tokens"]), first_diff(h["prompt_ids"], v["prompt_ids"])
        row = dict(image=label, question=question, same_prompt_ids=prompt_diff is None, prompt_first_diff=prompt_diff)
        row.update(prompt_len=[len(h["prompt_ids"]), len(v["prompt_ids"])], equal=diff is None, first_diff=diff)
        row.update(hf_tokens=h["tokens"], vllm_tokens=v["tokens"], hf_text=h["text"], vllm_text=v["text"])
        rows.append(dict(row, vllm_finish_reason=v["finish"]))
    ok = all(r["equal"] and r["same_prompt_ids"] for r in rows)
    report = dict(export=args.export, vllm=vllm.__version__, transformers=transformers.__version__, dtype=args.dtype)
    report.update(max_tokens=args.max_tokens, eos=args.eos, hf_eos_token_id=hf_eos, all_equal=ok, prompts=rows)
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":  # required: vLLM spawns its engine process (CUDA is already initialised here)
    sys.exit(main())
