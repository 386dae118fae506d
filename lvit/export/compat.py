"""An export that older loaders read too: the last transformers 4.x release (4.57), and vLLM, whose LLaVA loader
names the weights as transformers 4 did.

transformers 5 writes a few things differently from 4.x; each rewrite below leaves what transformers 5 loads
unchanged (the export's self-check reloads the rewritten folder) and was checked against 4.57.6 with
`scripts/check_older_transformers.py` (same prompt ids, greedy tokens and logits):

- weights: transformers 5 saves a CLIP / SigLIP tower as `vision_tower.embeddings...`; 4.x and vLLM expect
  `vision_tower.vision_model.embeddings...` and otherwise leave the whole tower at random values (4.x only warns;
  vLLM stops: "There is no module or parameter named 'vision_tower.embeddings'"). transformers 5 reads both names.
- `tokenizer_config.json`: `tokenizer_class` `TokenizersBackend` is unknown to 4.x (`PreTrainedTokenizerFast` is the
  same class in 5); `extra_special_tokens` as a list breaks 4.x (a mapping is read by both; only lvit's own
  `["<image>"]` is rewritten, a list the base tokenizer brought stays as it is); without
  `model_input_names` 4.x's generic tokenizer returns `token_type_ids`, which LLaVA's `generate` refuses.
- `config.json`: 4.x reads `text_config.rope_theta`, not transformers 5's `rope_parameters`, and falls back to 10000
  (wrong for Qwen, Mistral v0.2+, Llama 3 ...): the value is written in both places.
"""

from __future__ import annotations

import json
from pathlib import Path

_TOWER = "vision_tower."
_NESTED = "vision_tower.vision_model."
_INDEX = "model.safetensors.index.json"


def write_for_older_loaders(folder: Path, image_token: str) -> None:
    """Rewrite the export in `folder` (just saved by transformers 5) as described in the module doc."""
    _nest_tower_weights(folder)
    _tokenizer_config(folder / "tokenizer_config.json", image_token)
    _rope_theta(folder / "config.json")


def tower_weight_name(key: str) -> str:
    """`key` as transformers 4.x and vLLM name it: a tower weight under `vision_tower.vision_model.`."""
    if key.startswith(_TOWER) and not key.startswith(_NESTED):
        return _NESTED + key[len(_TOWER) :]
    return key


def _nest_tower_weights(folder: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if all(tower_weight_name(k) == k for k in keys):
                continue
            metadata = f.metadata() or {"format": "pt"}
            tensors = {tower_weight_name(k): f.get_tensor(k) for k in keys}
        save_file(tensors, str(path), metadata=metadata)
    index = folder / _INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {tower_weight_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


def _tokenizer_config(path: Path, image_token: str) -> None:
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if config.get("extra_special_tokens") == [image_token]:  # lvit's own; a base tokenizer's longer list stays
        config["extra_special_tokens"] = {"image_token": image_token}
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _rope_theta(path: Path) -> None:
    config = json.loads(path.read_text())
    text = config.get("text_config", {})
    theta = (text.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in text:
        text["rope_theta"] = theta
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
