"""An export against what vLLM's LLaVA loader requires (vLLM cannot run on this CPU machine).

The list was read from vLLM 0.34.0 (commit 62d4bc3c7): the model registry maps `LlavaForConditionalGeneration` to
`model_executor/models/llava.py`; that loader reads the config keys below, builds a CLIP / SigLIP / Pixtral tower,
a two-linear projector whose activation must be one `get_act_fn` knows (`model_executor/layers/activation.py`),
maps checkpoint names (`model.language_model.` -> `language_model.model.`, `model.vision_tower.` -> `vision_tower.`,
`model.multi_modal_projector.` -> `multi_modal_projector.`, `lm_head.` -> `language_model.lm_head.`) and refuses a
weight it has no parameter for (its CLIP / SigLIP modules hold the tower under `vision_model`). It expands each
`<image>` token itself into (image_size / patch_size)^2 tokens (+1 for CLIP's class token, -1 with the `default`
strategy) and checks the placeholder count against the images; the processor files and the chat template come from
the folder. `scripts/vllm_compare.py` runs the real thing on a GPU machine.
"""

from __future__ import annotations

import json

import pytest

from lvit.export.serving import VLLM_LINEAR_OVERRIDE

VLLM_ARCHITECTURES = {"LlavaForConditionalGeneration"}
VLLM_TOWERS = {"clip_vision_model", "siglip_vision_model", "pixtral"}
VLLM_STRATEGIES = {"default", "full", "class"}
VLLM_ACTIVATIONS = {
    "gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu", "relu2", "silu", "swish", "quick_gelu", "tanh",
    "sigmoid", "xielu",
}  # fmt: skip
VLLM_NAME_MAP = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
VLLM_PARAMETER_PREFIXES = (
    "language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.", "multi_modal_projector."
)  # fmt: skip


def _vllm_name(key: str) -> str:
    for old, new in VLLM_NAME_MAP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def vllm_problems(folder) -> list[str]:
    """What vLLM's LLaVA loader would refuse in the export `folder` (empty: nothing)."""
    from transformers import AutoProcessor

    from lvit.export.exporter import safetensors_keys
    from lvit.export.selfcheck import synthetic_image

    problems = []
    config = json.loads((folder / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    if set(config.get("architectures", [])) != VLLM_ARCHITECTURES:
        problems.append(f"architectures {config.get('architectures')}")
    if not (text.get("architectures") or text.get("model_type")):
        problems.append("text_config names no architecture or model_type")
    if vision.get("model_type") not in VLLM_TOWERS:
        problems.append(f"vision tower {vision.get('model_type')}")
    if not isinstance(config.get("vision_feature_layer"), int):
        problems.append("vision_feature_layer is not one layer (llava.py builds one)")
    if config.get("vision_feature_select_strategy") not in VLLM_STRATEGIES:
        problems.append(f"strategy {config.get('vision_feature_select_strategy')}")
    if config.get("projector_hidden_act") not in VLLM_ACTIVATIONS:
        problems.append(f"projector_hidden_act {config.get('projector_hidden_act')!r}")
    image_id = config.get("image_token_index", config.get("image_token_id"))
    unloadable = sorted(k for k in safetensors_keys(folder) if not _vllm_name(k).startswith(VLLM_PARAMETER_PREFIXES))
    if unloadable:
        problems.append(f"weights vLLM has no parameter for: {unloadable[:3]}")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if not (folder / name).is_file():
            problems.append(f"no {name}")
    if not any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        problems.append("no processor config")
    processor = AutoProcessor.from_pretrained(folder)
    if processor.tokenizer.convert_tokens_to_ids(processor.image_token) != image_id:
        problems.append("<image> is not the config's image token")
    if len(processor.tokenizer(processor.image_token, add_special_tokens=False).input_ids) != 1:
        problems.append("<image> is not one token")
    grid = (vision["image_size"] // vision["patch_size"]) ** 2
    cls = 1 if vision["model_type"] == "clip_vision_model" else 0
    expected = grid + cls - (1 if config.get("vision_feature_select_strategy") == "default" else 0)
    image = synthetic_image(vision["image_size"])
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]
    ids = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    ids = ids[0]
    if list(ids).count(image_id) != expected:
        problems.append(f"the processor expands <image> into {list(ids).count(image_id)} tokens, vLLM into {expected}")
    return problems


@pytest.fixture(scope="module")
def exported(tiny_runs, tmp_path_factory):
    from lvit.export.exporter import export

    out = tmp_path_factory.mktemp("vllm") / "export"
    export(tiny_runs["full"].out, out)
    return out


def test_an_export_meets_vllms_llava_loader_but_for_the_linear_projectors_activation(exported, tiny_runs):
    assert tiny_runs["full"].recipe.model.projector == "linear"  # LLaVA-1.0's W: "linear" is not in vLLM's list
    assert vllm_problems(exported) == ["projector_hidden_act 'linear'"]
    card = (exported / "README.md").read_text()
    assert "vllm serve" in card and json.dumps(VLLM_LINEAR_OVERRIDE) in card  # served with the identity instead
    tokenizer = json.loads((exported / "tokenizer_config.json").read_text())  # as transformers 4.x reads it too
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer["extra_special_tokens"] == {"image_token": "<image>"}
    assert tokenizer["model_input_names"] == ["input_ids", "attention_mask"]
    text = json.loads((exported / "config.json").read_text())["text_config"]
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"]


def test_the_checker_sees_what_vllm_refuses(exported, tmp_path):
    """The transformers-5 names of the tower weights (no `vision_model.`) are what vLLM refused before lvit renamed
    them; a list of feature layers and an unknown tower are refused too."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    for path in broken.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in tensors.items()}, path)
    config = json.loads((broken / "config.json").read_text())
    config["vision_feature_layer"] = [-2, -5]
    (broken / "config.json").write_text(json.dumps(config))
    problems = vllm_problems(broken)
    assert any("weights vLLM has no parameter for: ['vision_tower.embeddings" in p for p in problems)
    assert "vision_feature_layer is not one layer (llava.py builds one)" in problems
