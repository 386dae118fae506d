"""Model assembly: stock LLaVA class, exact projector size, tokenizer additions, plain reload."""

from __future__ import annotations

import torch
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaForConditionalGeneration,
)

from lvit.model.assemble import assemble
from lvit.model.stages import apply_stage, report_modules
from lvit.model.towers import num_image_tokens
from lvit.recipe.schema import ModelSection


def _assemble(tiny_parts, **kw):
    vision, lm = tiny_parts
    return assemble(ModelSection(vision_tower=str(vision), language_model=str(lm), **kw))


def test_image_tokens_for_vit_l14_at_224():
    # CLIP ViT-L/14 at 224 px: 16 x 16 patches, CLS dropped -> 256 tokens (paper / LLaVA)
    assert num_image_tokens(CLIPVisionConfig(image_size=224, patch_size=14)) == 256


def test_assembled_model_is_stock_llava(tiny_parts):
    model, processor = _assemble(tiny_parts)
    assert type(model) is LlavaForConditionalGeneration
    cfg = model.config
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.image_seq_length == num_image_tokens(cfg.vision_config) == 16
    assert not any(p.is_meta for p in model.parameters())


def test_linear_projector_trains_exactly_one_matrix_and_bias(tiny_parts):
    model, _ = _assemble(tiny_parts, projector="linear")
    vh = model.config.vision_config.hidden_size
    th = model.config.text_config.hidden_size
    for stage in ("align", "finetune"):
        apply_stage(model, stage, "linear")
        trainable = {
            n: p.numel() for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" in n
        }
        assert trainable == {
            "model.multi_modal_projector.linear_1.weight": vh * th,
            "model.multi_modal_projector.linear_1.bias": th,
        }
    # linear_2 is the identity: the projector computes W x + b exactly
    proj = model.model.multi_modal_projector
    x = torch.randn(3, vh)
    torch.testing.assert_close(proj(x), proj.linear_1(x), rtol=0, atol=1e-6)


def test_mlp2x_gelu_projector_trains_both_layers(tiny_parts):
    model, _ = _assemble(tiny_parts, projector="mlp2x_gelu")
    apply_stage(model, "align", "mlp2x_gelu")
    vh = model.config.vision_config.hidden_size
    th = model.config.text_config.hidden_size
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == vh * th + th + th * th + th
    assert model.config.projector_hidden_act == "gelu"


def test_stage_freezing_per_module(tiny_parts):
    model, _ = _assemble(tiny_parts)
    apply_stage(model, "align", "linear")
    rows = {r.name: (r.trainable, r.frozen) for r in report_modules(model)}
    assert rows["model.vision_tower"][0] == 0
    assert rows["model.language_model.layers"][0] == 0 and rows["lm_head"][0] == 0
    assert rows["model.multi_modal_projector.linear_1"][1] == 0
    apply_stage(model, "finetune", "linear")
    rows = {r.name: (r.trainable, r.frozen) for r in report_modules(model)}
    assert rows["model.vision_tower"][0] == 0
    assert rows["model.language_model.layers"][1] == 0 and rows["lm_head"][1] == 0
    assert rows["model.multi_modal_projector.linear_2"][0] == 0


def test_tokenizer_gains_image_and_pad_tokens(tiny_parts):
    _, lm_dir = tiny_parts
    original = AutoTokenizer.from_pretrained(lm_dir)
    assert original.pad_token is None and "<image>" not in original.get_vocab()
    old_rows = len(original)
    model, processor = _assemble(tiny_parts)
    tok = processor.tokenizer
    assert tok.pad_token == "<pad>" and "<image>" in tok.get_vocab()
    assert len(tok) == old_rows + 2
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    # new rows start at the mean of the old ones (deterministic, so a base can be rebuilt exactly)
    torch.testing.assert_close(emb[old_rows:], emb[:old_rows].mean(0, keepdim=True).expand(2, -1))
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.config.text_config.pad_token_id == tok.pad_token_id


def test_assembly_is_deterministic_apart_from_projector(tiny_parts):
    a, _ = _assemble(tiny_parts)
    b, _ = _assemble(tiny_parts)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if "multi_modal_projector.linear_1" not in name:
            assert torch.equal(pa, pb), name


def test_saved_model_loads_with_plain_transformers(tiny_parts, shapes_data, tmp_path):
    from PIL import Image

    model, processor = _assemble(tiny_parts)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    image = Image.open(next(shapes_data["images"].iterdir())).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    prompt = proc2.apply_chat_template(messages)
    assert prompt.endswith("USER: <image>\nWhat colour is the shape? ASSISTANT:")
    # the stock processor expands <image> to as many tokens as the vision tower yields
    inputs = proc2(images=image, text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == reloaded.config.image_token_id).sum() == 16
    with torch.no_grad():
        expected = model(**inputs).logits
        got = reloaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
