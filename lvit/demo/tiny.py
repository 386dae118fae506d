"""Tiny random stand-ins for CLIP and Vicuna, saved as ordinary Hugging Face folders.

The demo and the tests build these from configs, save them with `save_pretrained` and then load
them back through the same `from_pretrained` path that real checkpoints take, so the real loading
code runs without any download. The tokenizer is trained here on a small corpus.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lvit.demo import synthetic

# Sizes chosen so one training step takes a few tens of milliseconds on 2 CPU cores while the
# 4-bit path still works (bitsandbytes blocks need in_features >= 64).
# The text half a CLIP / SigLIP config requires; lvit never uses it (LLaVA keeps only the vision tower).
TINY_TOWER_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=100,
    max_position_embeddings=16,
)
TINY_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=64,
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Words the tiny tokenizer must know: the vicuna_v1 template and the demo's vocabulary.
_BASE_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Describe the image briefly. Give a brief description of the image.",
    "What colour is the shape? Where is the shape? What shape is it? What is in the picture?",
    "red green blue yellow square circle triangle cross left right top bottom a an the is in of",
    "The answer is A B C D yes no. 0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( ) - _ / \n",
]


def build_tokenizer(
    out_dir: str | Path, corpus: Iterable[str] = (), vocab_size: int = 400, style: str = "metaspace"
) -> Path:
    """Train a small BPE tokenizer and save it as a Hugging Face tokenizer folder.

    `style="metaspace"` behaves like Llama's SentencePiece tokenizer (a "▁" marks word starts);
    `style="bytelevel"` behaves like GPT-2's. Like Vicuna's, it has `<s>`, `</s>` and `<unk>`
    but no pad and no image token: lvit adds those when it assembles a model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    elif style == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator([*_BASE_CORPUS, *corpus], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    return out_dir


def build_tiny_parts(
    root: str | Path,
    corpus: Iterable[str] = (),
    seed: int = 0,
    tokenizer_style: str = "metaspace",
    vision: dict | None = None,
    text: dict | None = None,
) -> tuple[Path, Path]:
    """Write a tiny CLIP checkpoint and a tiny Llama checkpoint (with tokenizer) under `root`.

    Returns `(vision_dir, language_model_dir)`, ready for a recipe's `model.vision_tower` and
    `model.language_model`. The CLIP folder holds a full `CLIPModel` (text tower included), like
    `openai/clip-vit-large-patch14`, plus its image processor.
    """
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    root = Path(root)
    vision_dir, lm_dir = root / "tiny-clip", root / "tiny-vicuna"
    torch.manual_seed(seed)

    v = {**TINY_VISION, **(vision or {})}
    clip_config = CLIPConfig(
        vision_config={k: val for k, val in v.items() if k != "projection_dim"},
        text_config={**TINY_TOWER_TEXT, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        projection_dim=v["projection_dim"],
    )
    CLIPModel(clip_config).save_pretrained(vision_dir)
    size = v["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
    ).save_pretrained(vision_dir)

    build_tokenizer(lm_dir, corpus, style=tokenizer_style)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    t = {**TINY_TEXT, **(text or {})}
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **t,
    )
    LlamaForCausalLM(lm_config).save_pretrained(lm_dir)
    return vision_dir, lm_dir


# --- a SigLIP-shaped tower and language models of other families ---------------------------------------------


def build_tiny_siglip(out_dir: str | Path, seed: int = 0, vision: dict | None = None) -> Path:
    """A tiny SigLIP checkpoint (a full `SiglipModel`, text tower included, as google/siglip-* and the
    fixed-resolution google/siglip2-* checkpoints are) with its image processor (a plain resize to the
    tower's size, no crop). No CLS token: every position of its output is a patch."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    v = {k: val for k, val in {**TINY_VISION, **(vision or {})}.items() if k != "projection_dim"}
    config = SiglipConfig(
        vision_config=v,
        text_config=TINY_TOWER_TEXT,
    )
    out_dir = Path(out_dir)
    SiglipModel(config).save_pretrained(out_dir)
    size = v["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(out_dir)
    return out_dir


def family_corpus() -> list[str]:
    """Text the family tokenizers (tests/fixtures/*-tokenizer, `scripts/make_family_tokenizers.py`) are
    trained on: the tiny corpus, the synthetic task's words and the chat templates' role words."""
    chat = "user assistant model system Hello. Hi. Bye. Be brief. What is it? A red square. Where? Top left.\n\n"
    return [*_BASE_CORPUS, *synthetic.corpus(), chat * 3]


# Language-model families lvit is tested with: the transformers config class of the text model and whether
# the real models pad their vocabulary (more embedding rows than tokenizer entries: Qwen2.5's 151,665 tokens
# have 151,936 rows up to 3B and 152,064 from 7B (the models' config.json on the Hub); Gemma 3 262,208 rows).
LM_FAMILIES = {
    "llama3": ("LlamaConfig", False),
    "qwen2": ("Qwen2Config", True),
    "qwen3": ("Qwen3Config", True),
    "mistral": ("MistralConfig", False),
    "gemma2": ("Gemma2Config", False),
    "gemma3": ("Gemma3TextConfig", True),
}


def padded_rows(n_tokens: int, multiple: int = 64, spare: int = 2) -> int:
    """Embedding rows of a padded vocabulary: `n_tokens` + at least `spare`, rounded up to `multiple`."""
    return -(-(n_tokens + spare) // multiple) * multiple


def build_family_lm(
    out_dir: str | Path, family: str, tokenizer_dir: str | Path, seed: int = 0, text: dict | None = None
) -> Path:
    """A tiny causal LM of `family` (`LM_FAMILIES`) with the tokenizer saved in `tokenizer_dir` (copied in).

    Families whose real models pad their vocabulary get a padded one here too (`padded_rows`), so lvit's
    `<image>` and pad tokens take spare rows."""
    import shutil

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, padded = LM_FAMILIES[family]
    out_dir = Path(out_dir)
    shutil.copytree(tokenizer_dir, out_dir, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    t = {**TINY_TEXT, "head_dim": TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"], **(text or {})}
    if family.startswith("gemma"):
        t.update(tie_word_embeddings=True, sliding_window=64)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=padded_rows(len(tokenizer)) if padded else len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **t,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return out_dir
