"""The vision tower and projector of an exported LLaVA folder as an mmproj GGUF that llama.cpp's multimodal library
(`mtmd`, its `clip` code) loads: projector type `mlp`, the type of the GGUF files of LLaVA-1.5 on the Hub.

Written with the `gguf` package's writer, because llama.cpp's own `convert_hf_to_gguf.py` takes a stock
`LlavaForConditionalGeneration` only with a Pixtral tower (its `LlavaVisionModel` raises "Unsupported model type"
for CLIP and SigLIP), and its older route (`tools/mtmd/legacy-models/`) reads the original LLaVA repository's
layout, not a Hugging Face one. What llama.cpp reads is in its `tools/mtmd/clip.cpp` (keys `clip.*`, tensors
`v.*` and `mm.*`); what it computes for this projector type is in `tools/mtmd/models/llava.cpp`:

- the tower runs up to the feature layer (by default the second to last, LLaVA's `vision_feature_layer: -2`; any
  other layer is written as `clip.vision.feature_layer`), without the post-layernorm, as transformers'
  `hidden_states[layer]` are;
- the CLS position is dropped when the tower has one (LLaVA's `vision_feature_select_strategy: default`);
- the projector is `mm.2(gelu(mm.0(x)))`, with llama.cpp's tanh-form GELU.

LLaVA-1.0's one-matrix `linear` projector has no such form: llama.cpp always applies a GELU between the two
matrices. It is written exactly all the same: `mm.0` adds a constant `shift` to every output and `mm.2` takes it
away again, so every value the GELU sees is at least 10, where llama.cpp's GELU returns its input unchanged (the
CPU code's `x >= 10` branch; the tanh form is exactly 1 there in float32 on GPUs). `shift` is chosen from the
projector inputs of the check images (`linear_shift`); the export's llama.cpp check shows it held.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lvit.errors import LvitError

# What clip.cpp's llava graph computes with each transformers activation of the tower ("" = its default, the
# quick GELU CLIP was trained with).
_TOWER_ACTIVATIONS = {"quick_gelu": "", "gelu_pytorch_tanh": "gelu", "gelu": "gelu"}
_GELU_IDENTITY_FROM = 10.0  # llama.cpp's GELU returns x unchanged from here up

# transformers 5 saves a LLaVA's tower as `vision_tower.` + the vision model's own names; other writers put
# `model.` before it or `vision_model.` after it: all are read.
_TOWER_PREFIXES = tuple(a + "vision_tower." + b for a in ("model.", "") for b in ("vision_model.", ""))
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")

_RENAMES = [  # transformers' CLIP / SigLIP vision names -> clip.cpp's
    (r"^embeddings\.class_embedding$", "v.class_embd"),
    (r"^embeddings\.patch_embedding\.(weight|bias)$", r"v.patch_embd.\1"),
    (r"^embeddings\.position_embedding\.weight$", "v.position_embd.weight"),
    (r"^pre_layrnorm\.(weight|bias)$", r"v.pre_ln.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", r"v.blk.\1.attn_\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$", r"v.blk.\1.attn_out.\2"),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$", r"v.blk.\1.ln1.\2"),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$", r"v.blk.\1.ln2.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$", r"v.blk.\1.ffn_up.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$", r"v.blk.\1.ffn_down.\2"),
]
# Not in the mmproj: what LLaVA never computes with (the feature layer is taken before them).
_SKIPPED = re.compile(r"^(post_layernorm\.|head\.)")


def vision_settings(folder: Path) -> dict:
    """What the mmproj needs from an export's `config.json`, checked: refuses what llama.cpp's llava graph cannot
    compute, naming the setting."""
    config = json.loads((folder / "config.json").read_text())
    vision = config["vision_config"]
    kind = vision.get("model_type", "")
    if kind not in ("clip_vision_model", "siglip_vision_model"):
        raise LvitError(
            f"lvit export --gguf: the vision tower is {kind!r}; the mmproj writer knows CLIP and SigLIP towers "
            "(llama.cpp's LLaVA graph). Export without --gguf, or use a CLIP / SigLIP tower."
        )
    act = vision.get("hidden_act", "quick_gelu")
    if act not in _TOWER_ACTIVATIONS:
        raise LvitError(f"lvit export --gguf: the tower's activation {act!r} has no llama.cpp LLaVA equivalent.")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise LvitError(
            f"lvit export --gguf: vision_feature_layer {layer!r} (several layers) is not supported by llama.cpp's "
            "LLaVA graph; only one feature layer is."
        )
    n_layer = vision["num_hidden_layers"]
    index = layer if layer >= 0 else n_layer + 1 + layer  # an index into transformers' hidden_states
    has_cls = kind == "clip_vision_model"
    strategy = config.get("vision_feature_select_strategy", "default")
    if has_cls and strategy != "default":
        raise LvitError(
            "lvit export --gguf: vision_feature_select_strategy 'full' keeps the CLS feature; llama.cpp's LLaVA "
            "graph always drops it. Export without --gguf."
        )
    act_name = config.get("projector_hidden_act", "gelu")
    projector = {"gelu": "mlp2x_gelu", "linear": "linear"}.get(act_name)
    if projector is None:
        raise LvitError(f"lvit export --gguf: projector activation {act_name!r} has no llama.cpp equivalent.")
    return {
        "vision": vision,
        "feature_index": index,
        "projector": projector,
        "text_hidden": config["text_config"]["hidden_size"],
        "tower": "siglip" if kind == "siglip_vision_model" else "clip",
    }


def read_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The tensors of the export's safetensors whose names start with one of `prefixes`, the prefix cut, in fp32."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
                if prefix is not None:
                    out[key[len(prefix) :]] = f.get_tensor(key).float().numpy()
    return out


def linear_shift(pre_activations: np.ndarray) -> float:
    """The constant a `linear` projector's `mm.0` adds (see the module doc): 10 above the most negative value its
    outputs took on the check images, doubled for images unlike them, at least 16."""
    low = float(np.min(pre_activations)) if pre_activations.size else 0.0
    return max(16.0, 2.0 * (_GELU_IDENTITY_FROM - low))


def write_mmproj(
    folder: Path, settings: dict, image_processor: dict, path: Path, dtype: str = "f16", shift: float = 0.0
) -> dict:
    """Write the mmproj GGUF of the export in `folder` to `path`. `settings`: its `vision_settings`;
    `image_processor`: the export's image processor settings (`image_mean`, `image_std`); `dtype`: "f16" or "f32"
    for the matrices (norms, biases and embeddings stay f32); `shift`: for a `linear` projector, `linear_shift`'s
    constant. Returns what was written."""
    import gguf

    vision = settings["vision"]
    tower = read_tensors(folder, _TOWER_PREFIXES)
    projector = read_tensors(folder, _PROJECTOR_PREFIXES)
    if not tower or set(projector) != {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}:
        raise LvitError(f"lvit export --gguf: {folder} holds no LLaVA vision tower and two-linear projector.")

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_projection_dim(settings["text_hidden"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    default_eps = 1e-5 if settings["tower"] == "clip" else 1e-6  # CLIPVisionConfig's / SiglipVisionConfig's
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", default_eps))
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_image_mean([float(x) for x in image_processor["image_mean"]])
    writer.add_vision_image_std([float(x) for x in image_processor["image_std"]])
    if _TOWER_ACTIVATIONS[vision.get("hidden_act", "quick_gelu")] == "gelu":
        writer.add_vision_use_gelu(True)
    if settings["feature_index"] != vision["num_hidden_layers"] - 1:  # not llama.cpp's default (LLaVA's -2)
        writer.add_array("clip.vision.feature_layer", [settings["feature_index"]])

    same_ffn = vision["intermediate_size"] == vision["hidden_size"]
    for name, array in tower.items():
        if _SKIPPED.match(name):
            continue
        target = _rename(name)
        if same_ffn:  # clip.cpp swaps ffn_up/ffn_down of mlp-type files whose ffn_down is n_embd wide (an old naming)
            target = target.replace("ffn_up", "ffn_tmp").replace("ffn_down", "ffn_up").replace("ffn_tmp", "ffn_down")
        writer.add_tensor(target, _cast(target, array, dtype))
    for target, array in _projector_tensors(projector, settings["projector"], shift).items():
        writer.add_tensor(target, _cast(target, array, dtype))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"projector": settings["projector"], "tower": settings["tower"], "shift": shift, "dtype": dtype}


def _rename(name: str) -> str:
    for pattern, target in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, target, name)
    raise LvitError(f"lvit export --gguf: the tower tensor {name!r} has no llama.cpp name; this is an lvit bug.")


def _projector_tensors(projector: dict[str, np.ndarray], kind: str, shift: float) -> dict[str, np.ndarray]:
    w1, b1 = projector["linear_1.weight"], projector["linear_1.bias"]
    w2, b2 = projector["linear_2.weight"], projector["linear_2.bias"]
    if kind == "linear":  # mm.2(gelu(mm.0 x + shift)) == linear_2(linear_1 x) while mm.0 x + shift >= 10
        b1 = b1 + np.float32(shift)
        b2 = b2 - w2.astype(np.float64) @ np.full(w2.shape[1], shift, dtype=np.float64)
    return {"mm.0.weight": w1, "mm.0.bias": b1, "mm.2.weight": w2, "mm.2.bias": b2.astype(np.float32)}


def _cast(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """Matrices (and the patch kernel) in `dtype`; vectors, biases and embeddings added to activations in f32."""
    keep_f32 = array.ndim < 2 or name in ("v.position_embd.weight", "v.class_embd")
    return np.ascontiguousarray(array.astype(np.float16 if dtype == "f16" and not keep_f32 else np.float32))
