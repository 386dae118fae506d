"""A SentencePiece `tokenizer.model` for a Llama-style tokenizer that exists only as `tokenizer.json`.

Llama 1/2, Vicuna, Mistral v0.x and others tokenize with SentencePiece BPE: a piece's *score* decides which
adjacent pair merges first. transformers' fast tokenizer keeps that order as BPE merge ranks in `tokenizer.json`,
and saves no `tokenizer.model`. llama.cpp's converter, given only `tokenizer.json` (its `LlamaHfVocab`), writes
every score as -1000, so llama.cpp merges in another order and tokenizes text differently from transformers
(seen in lvit's llama.cpp check: " USER:" became `▁USE R :` instead of `▁US ER :`).

`sentencepiece_model` rebuilds the scores from the merges: a piece's score is minus the rank of the first merge
that makes it (transformers built those merges by sorting on the original scores, so the order is the original
one); pieces no merge makes come after all merged ones. The result is an ordinary SentencePiece model file, which
the converter reads instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_BYTE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def is_llama_bpe(tokenizer_json: dict) -> bool:
    """A SentencePiece-style BPE in `tokenizer.json` (`▁` for spaces, usually with byte fallback): what llama.cpp
    reads as a SentencePiece ("llama") vocabulary."""
    model = tokenizer_json.get("model", {})
    return (
        model.get("type") == "BPE"
        and not model.get("ignore_merges", False)
        and "▁" in json.dumps([tokenizer_json.get(k) for k in ("normalizer", "pre_tokenizer")], ensure_ascii=False)
    )


def space_after_special(tokenizer_json: dict) -> bool:
    """Whether the tokenizer puts a `▁` before text that follows a special token, as llama.cpp's `llama` vocabulary
    does when its `add_space_prefix` is set. Llama 2's legacy tokenizer does (its normalizer prepends `▁` to every
    piece of text); Metaspace with `prepend_scheme: first` (transformers' non-legacy Llama) prepends only at the very
    start of the input, which in a chat prompt is the BOS token, so it adds none (llama.cpp cannot do "first": false
    is what chat prompts need)."""
    normalizer = json.dumps(tokenizer_json.get("normalizer"))
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence":
        pre = next((p for p in pre.get("pretokenizers", []) if p.get("type") == "Metaspace"), {})
    scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space") else None)
    return '"Prepend"' in normalizer or scheme == "always"


def sentencepiece_model(tokenizer_json: dict) -> bytes:
    """The serialized SentencePiece ModelProto of a tokenizer for which `is_llama_bpe` holds."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = tokenizer_json["model"]
    vocab: dict[str, int] = model["vocab"]
    rank: dict[str, int] = {}
    for i, merge in enumerate(model["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, i)
    special = {t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
    unk = model.get("unk_token")
    n_merges = len(model["merges"])

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.ModelType.BPE
    proto.trainer_spec.vocab_size = len(vocab)
    proto.trainer_spec.byte_fallback = bool(model.get("byte_fallback"))
    proto.trainer_spec.unk_id = vocab.get(unk, 0) if unk else 0
    proto.trainer_spec.bos_id = vocab.get("<s>", -1)
    proto.trainer_spec.eos_id = vocab.get("</s>", -1)
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = space_after_special(tokenizer_json)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    types = pb.ModelProto.SentencePiece.Type
    for piece_text, index in sorted(vocab.items(), key=lambda item: item[1]):
        piece = proto.pieces.add()
        piece.piece = piece_text
        if piece_text == unk:
            piece.type, piece.score = types.UNKNOWN, 0.0
        elif piece_text in special:
            piece.type, piece.score = types.CONTROL, 0.0
        elif _BYTE.match(piece_text):
            piece.type, piece.score = types.BYTE, 0.0
        else:
            piece.type = types.NORMAL
            piece.score = -float(rank.get(piece_text, n_merges + index))
    return proto.SerializeToString()


def write_sentencepiece_model(folder: Path) -> bool | None:
    """Write `folder/tokenizer.model` from `folder/tokenizer.json` when it is a Llama-style BPE and no
    `tokenizer.model` is there. Returns None when it wrote none, else `space_after_special` (what the GGUF's
    `tokenizer.ggml.add_space_prefix` must say: llama.cpp's converter leaves it to llama.cpp's default, true)."""
    target, source = folder / "tokenizer.model", folder / "tokenizer.json"
    if target.exists() or not source.is_file():
        return None
    tokenizer_json = json.loads(source.read_text(encoding="utf-8"))
    if not is_llama_bpe(tokenizer_json):
        return None
    target.write_bytes(sentencepiece_model(tokenizer_json))
    return space_after_special(tokenizer_json)
