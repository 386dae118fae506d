"""Language-model families with their own chat formats (`data.template: auto`), padded vocabularies and
SigLIP towers, on tiny models built from each family's transformers config.

Tokenizers: each family's kind with its real special tokens and its REAL chat template
(tests/fixtures/{llama3,llama3_1,qwen3,gemma3}-tokenizer: byte-level BPE for Llama 3 and Qwen, SentencePiece-style
for Gemma). Families that split text as one of those reuse its vocabulary with their own real config and chat
template (tests/fixtures/*-chat-template): Qwen2.5 (`qwen2`, default system prompt) on Qwen3's, Gemma 2 on
Gemma 3's, Mistral-7B-Instruct-v0.1 on LLaMA-2's real SentencePiece tokenizer. Llama 3.1 (date system header) is
template-only: its tiny model is a Llama 3 one and it has no end-to-end run.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TinyRecipes, trained_runs

from lvit.demo.tiny import LM_FAMILIES, build_family_lm, build_tiny_parts, build_tiny_siglip, padded_rows
from lvit.errors import LvitError
from lvit.export.selfcheck import synthetic_image
from lvit.model.processor import build_processor, load_tokenizer
from lvit.model.towers import num_image_tokens, vision_config_of
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Conversation, chat_messages
from lvit.templates.encoder import ConversationEncoder

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = [*LM_FAMILIES, "llama3_1"]
LM = {"llama3_1": "llama3"}  # template-only families: the LM family their tiny model is built as
TOKENIZER = {"llama3": "llama3", "llama3_1": "llama3_1", "qwen3": "qwen3", "gemma3": "gemma3"}
# family -> (fixture tokenizer whose vocabulary it reuses, folder with its real config and chat template)
PAIRED = {
    "qwen2": ("qwen3", "qwen2_5-chat-template"),
    "gemma2": ("gemma3", "gemma2-chat-template"),
    "mistral": ("llama2", "mistral-chat-template"),
}
# (end-of-turn token, text before an answer, BOS token or None) of each family's real chat template
EXPECTED = {
    "llama3": ("<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|begin_of_text|>"),
    "llama3_1": ("<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|begin_of_text|>"),
    "qwen2": ("<|im_end|>", "<|im_start|>assistant\n", None),
    "qwen3": ("<|im_end|>", "<|im_start|>assistant\n", None),
    "mistral": ("</s>", " [/INST]", "<s>"),
    "gemma2": ("<end_of_turn>", "<start_of_turn>model\n", "<bos>"),
    "gemma3": ("<end_of_turn>", "<start_of_turn>model\n", "<bos>"),
}
# The exact trained tokens of SINGLE's answer and MULTI's second answer (MULTI's first is SINGLE's without a think
# block), as the fixture tokenizers split them: each answer and its end-of-turn token, nothing else.
_THINK = ["<think>", "Ċ", "Ċ", "</think>", "Ċ", "Ċ"]  # Qwen3's template: an empty think block before the last answer
_LLAMA3 = (["A", "Ġred", "Ġsquare", ".", "<|eot_id|>"], ["on", "Ġthe", "Ġleft", "<|eot_id|>"])
_GEMMA = (["A▁red▁squa", "re", ".", "<end_of_turn>"], ["on", "▁the▁", "lef", "t", "<end_of_turn>"])
TRAINED = {
    "llama3": _LLAMA3,
    "llama3_1": _LLAMA3,
    "qwen2": (["A", "Ġred", "Ġsquare", ".", "<|im_end|>"], ["on", "Ġthe", "Ġleft", "<|im_end|>"]),
    "qwen3": ([*_THINK, "A", "Ġred", "Ġsquare", ".", "<|im_end|>"], [*_THINK, "on", "Ġthe", "Ġleft", "<|im_end|>"]),
    "mistral": (["A", "▁red", "▁square", ".", "</s>"], ["on", "▁the", "▁left", "</s>"]),
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
}
# Families tested end to end with a SigLIP tower (the others with CLIP)
SIGLIP = {"llama3", "qwen3", "gemma2"}

Q1, A1 = "What colour is the shape?", "A red square."
Q2, A2 = "Where is the shape?", "on the left"
SINGLE = Conversation([("user", Q1), ("assistant", A1)], has_image=True)
MULTI = Conversation([("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)], has_image=True)


def tokenizer_dir(family: str, root: Path) -> Path:
    """The family's tokenizer folder; a `PAIRED` family's: the other fixture's vocabulary with its own config
    (when its folder has one) and chat template (`chat_template.jinja`, else the config's)."""
    if family not in PAIRED:
        return FIXTURES / f"{TOKENIZER[family]}-tokenizer"
    base, own = (FIXTURES / name for name in (f"{PAIRED[family][0]}-tokenizer", PAIRED[family][1]))
    folder = root / f"{family}-tokenizer"
    if not folder.exists():
        shutil.copytree(base, folder)
        if (own / "tokenizer_config.json").exists():
            shutil.copy(own / "tokenizer_config.json", folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        if (own / "chat_template.jinja").exists():
            config["chat_template"] = (own / "chat_template.jinja").read_text()
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """family -> (vision_dir, lm_dir), built on first use; one CLIP and one SigLIP tower for all."""
    root = tmp_path_factory.mktemp("families")
    towers = {"clip": build_tiny_parts(root / "clip")[0], "siglip": build_tiny_siglip(root / "siglip")}

    @functools.cache
    def get(family: str) -> tuple[Path, Path]:
        lm = build_family_lm(root / f"lm-{family}", LM.get(family, family), tokenizer_dir(family, root))
        return towers["siglip" if family in SIGLIP else "clip"], lm

    return get


def _processor(vision_dir: Path, tokenizer, export_dir: Path):
    """The processor lvit exports for `data.template: auto`, saved and loaded back as a user gets it."""
    from transformers import AutoProcessor

    from lvit.model.processor import load_image_processor

    processor = build_processor(load_image_processor(vision_dir), tokenizer, vision_config_of(str(vision_dir)), "auto")
    processor.save_pretrained(export_dir)
    return AutoProcessor.from_pretrained(export_dir)


def _chat_ids(processor, conv: Conversation, **kwargs) -> list[int]:
    size = processor.image_processor.size.get("height") or processor.image_processor.crop_size["height"]
    image = synthetic_image(size) if conv.has_image else None
    return list(processor.apply_chat_template(chat_messages(conv, image), tokenize=True, **kwargs)[0])


def _auto_encoder(parts, family: str, tmp_path: Path):
    """`(tokenizer, processor, encoder)` of a family's parts: its tokenizer, the processor lvit exports for it,
    and the `data.template: auto` encoder; the image token id and count are the encoder's."""
    vision_dir, lm_dir = parts(family)
    tokenizer = load_tokenizer(str(lm_dir))
    processor = _processor(vision_dir, tokenizer, tmp_path / "export")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    encoder = ConversationEncoder("auto", tokenizer, image_id, num_image_tokens(vision_config_of(str(vision_dir))))
    return tokenizer, processor, encoder


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_template_trains_exactly_the_answers_and_matches_the_chat_template(family, parts, tmp_path):
    tokenizer, processor, encoder = _auto_encoder(parts, family, tmp_path)
    image_id, n_img = encoder.image_token_id, encoder.num_image_tokens
    end, before_answer, bos = EXPECTED[family]
    assert encoder.template.end_of_turn == end
    end_id = tokenizer.convert_tokens_to_ids(end)
    single, second = TRAINED[family]
    first = [t for t in single if t not in _THINK]
    for conv, expected in ((SINGLE, single), (MULTI, [*first, *second])):
        enc = encoder.encode(conv)
        assert tokenizer.convert_ids_to_tokens([t for t in enc.labels if t != IGNORE_INDEX]) == expected
        # the ids are the exported chat template's (vLLM / transformers see what training saw)
        assert enc.input_ids == _chat_ids(processor, conv)
        assert enc.input_ids.count(image_id) == n_img
        assert (enc.input_ids[0] == tokenizer.convert_tokens_to_ids(bos)) if bos else enc.input_ids[0] != image_id
        # trained: exactly each answer (as the template renders it) and its end-of-turn token, nothing else
        runs = trained_runs(enc.labels)
        answers = [a for role, a in conv.turns if role == "assistant"]
        assert len(runs) == len(answers)
        for k, (run, answer) in enumerate(zip(runs, answers, strict=True)):
            assert run[-1] == end_id and end_id not in run[:-1]
            text = tokenizer.decode(run[:-1], skip_special_tokens=False)
            if family == "qwen3" and k == len(answers) - 1:
                # Qwen3's template writes an empty think block before its last answer: generated, so trained
                assert text.replace("<think>\n\n</think>\n\n", "") == answer, text
            else:
                assert text == answer, text
        starts = [i for i in range(1, len(enc.labels)) if enc.labels[i] != IGNORE_INDEX == enc.labels[i - 1]]
        for start in starts:  # every answer follows the template's assistant header; nothing before is trained
            assert tokenizer.decode(enc.input_ids[:start], skip_special_tokens=False).endswith(before_answer)
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(enc.labels, enc.input_ids, strict=True))
        # generation prompt == the training sample up to the last answer == the chat template's prompt
        prompt = Conversation(conv.turns[:-1], conv.has_image)
        gen = encoder.encode(prompt, for_generation=True)
        assert gen.input_ids == _chat_ids(processor, prompt, add_generation_prompt=True)
        assert set(gen.labels) == {IGNORE_INDEX}
        assert gen.input_ids == enc.input_ids[: len(gen.input_ids)]
        assert enc.labels[len(gen.input_ids)] != IGNORE_INDEX
    # lengths() (data check, training's up-front measure) agrees with encode()
    lengths = encoder.lengths([SINGLE, MULTI])
    assert lengths.total == [len(encoder.encode(c).input_ids) for c in (SINGLE, MULTI)]
    assert lengths.first_trained == [encoder.encode(c).first_trained for c in (SINGLE, MULTI)]


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_auto_template_with_several_images(family, parts, tmp_path):
    """A record with two images (each `<image>` where it stands): the ids are the exported chat template's."""
    tokenizer, processor, encoder = _auto_encoder(parts, family, tmp_path)
    image_id, n_img = encoder.image_token_id, encoder.num_image_tokens
    conv = Conversation(
        [("user", f"{IMAGE_PLACEHOLDER}\nBefore, {IMAGE_PLACEHOLDER}\nafter: {Q1}"), ("assistant", A1)], has_image=True
    )
    enc = encoder.encode(conv)
    size = processor.image_processor.size.get("height") or processor.image_processor.crop_size["height"]
    messages = chat_messages(conv, [synthetic_image(size), synthetic_image(size)])
    assert enc.input_ids == list(processor.apply_chat_template(messages, tokenize=True)[0])
    assert enc.input_ids.count(image_id) == 2 * n_img
    assert tokenizer.convert_ids_to_tokens([t for t in enc.labels if t != IGNORE_INDEX])[-1] == EXPECTED[family][0]


def _write_template(tmp_path: Path, template: str) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(FIXTURES / "qwen3-tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if template is None:
        config.pop("chat_template")
    else:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# lvit's own toy templates, each with one flaw
_SYSTEM_IN_LAST_TURN = (  # the system prompt goes into the LAST user turn: earlier turns render differently
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}<|im_start|>user\n"
    "{%- if loop.last and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}\n{%- endif -%}"
    "{{ m['content'] }}<|im_end|>\n{%- else -%}<|im_start|>assistant\n{{ m['content'] }}<|im_end|>\n{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
_NO_END_TOKEN = (  # turns end with plain text: generation could not stop
    "{%- for m in messages -%}{{ m['role'] }}: {{ m['content'] }}\n{%- endfor -%}"
    "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
)


# Text the real templates write into the system header themselves (Qwen/Qwen2.5-7B-Instruct's default system
# prompt; Llama 3.1's knowledge-cutoff and default date lines), with and without the conversation's own prompt
SYSTEM_HEADER = {
    "qwen2": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
              "<|im_start|>system\nBe brief.<|im_end|>\n"),
    "llama3_1": ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                 "Today Date: 26 Jul 2024\n\n<|eot_id|>",
                 "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                 "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"),
}  # fmt: skip


@pytest.mark.parametrize("family", list(SYSTEM_HEADER))
def test_a_system_header_the_template_writes_itself_is_never_trained(family, parts, tmp_path):
    """The real template writes system text of its own (default prompt, dates): lvit splits it exactly, keeps it in
    the prompt, trains only the answers; a conversation's system prompt takes the template's place."""
    tokenizer, processor, encoder = _auto_encoder(parts, family, tmp_path)
    single, second = TRAINED[family]
    for conv, header in zip((MULTI, Conversation(MULTI.turns, has_image=True, system="Be brief.")),
                            SYSTEM_HEADER[family], strict=True):  # fmt: skip
        enc = encoder.encode(conv)
        assert enc.input_ids == _chat_ids(processor, conv)
        assert tokenizer.convert_ids_to_tokens([t for t in enc.labels if t != IGNORE_INDEX]) == [*single, *second]
        prompt = tokenizer.decode(enc.input_ids[: enc.first_trained], skip_special_tokens=False)
        assert header in prompt and prompt.count("system") == 1
        gen = encoder.encode(Conversation(conv.turns[:-1], True, system=conv.system), for_generation=True)
        assert gen.input_ids == enc.input_ids[: len(gen.input_ids)]


@pytest.mark.parametrize(
    "template, reason",
    [
        (None, "has no chat template"),
        (_NO_END_TOKEN, "followed by no special token"),
        (_SYSTEM_IN_LAST_TURN, "differently when more turns follow"),
    ],
)
def test_auto_template_refuses_a_template_it_cannot_split(template, reason, tmp_path):
    tokenizer = load_tokenizer(str(_write_template(tmp_path, template)))
    with pytest.raises(LvitError, match=reason):
        ConversationEncoder("auto", tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), 4)


@pytest.mark.parametrize(
    "family, message", [("mistral", "Conversation roles must alternate"), ("gemma2", "System role not supported")]
)
def test_a_record_the_chat_template_refuses_is_listed_with_the_reason(family, message, parts):
    """Mistral v0.1's and Gemma 2's templates raise on a system turn: that record is left out with the template's
    message."""
    tokenizer = load_tokenizer(str(parts(family)[1]))
    encoder = ConversationEncoder("auto", tokenizer, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), 4)
    with_system = Conversation(SINGLE.turns, has_image=True, system="Be brief.")
    lengths = encoder.lengths([SINGLE, with_system])
    assert list(lengths.rejected) == [1] and lengths.total[0] > 0
    assert "the chat template refuses the conversation" in lengths.rejected[1]
    assert message in lengths.rejected[1]  # the template's own words
    with pytest.raises(ValueError, match="refuses the conversation"):
        encoder.encode(with_system)


def test_padded_vocabulary_image_and_pad_take_spare_rows(parts):
    """Qwen-like: more embedding rows than tokenizer entries; lvit's tokens take the spare rows, nothing grows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lvit.model.assemble import assemble
    from lvit.recipe.schema import ModelSection

    vision_dir, lm_dir = parts("qwen2")
    own = len(AutoTokenizer.from_pretrained(lm_dir))
    base = AutoModelForCausalLM.from_pretrained(lm_dir).get_input_embeddings().weight.detach().clone()
    rows = padded_rows(own)
    assert base.shape[0] == rows > own + 1  # padded
    model, processor = assemble(ModelSection(vision_tower=str(vision_dir), language_model=str(lm_dir)), template="auto")
    tokenizer = processor.tokenizer
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape[0] == rows == model.config.text_config.vocab_size  # not resized
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert model.config.image_token_id == image_id == own  # the first spare row (Qwen has its own pad token)
    assert len(tokenizer) == own + 1
    torch.testing.assert_close(weight[image_id], base[:own].mean(dim=0), rtol=0, atol=0)
    assert torch.equal(weight[:own], base[:own]) and torch.equal(weight[own + 1 :], base[own + 1 :])


def test_unpadded_vocabulary_grows_by_the_added_tokens(parts):
    from transformers import AutoTokenizer

    from lvit.model.assemble import assemble
    from lvit.recipe.schema import ModelSection

    vision_dir, lm_dir = parts("llama3")  # no pad token of its own: <image> and <pad> are appended
    own = len(AutoTokenizer.from_pretrained(lm_dir))
    model, processor = assemble(ModelSection(vision_tower=str(vision_dir), language_model=str(lm_dir)))
    assert model.get_input_embeddings().weight.shape[0] == own + 2 == len(processor.tokenizer)


# --- vision towers -------------------------------------------------------------------------------------------------


def test_image_token_counts_per_tower():
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    assert num_image_tokens(CLIPVisionConfig(image_size=224, patch_size=14)) == 256  # LLaVA: CLS dropped
    assert num_image_tokens(CLIPVisionConfig(image_size=336, patch_size=14)) == 576  # LLaVA-1.5
    assert num_image_tokens(CLIPVisionConfig(image_size=336, patch_size=14), "full") == 577
    siglip = SiglipVisionConfig(image_size=384, patch_size=14)  # so400m/14 at 384 px (SigLIP and SigLIP2)
    assert num_image_tokens(siglip) == num_image_tokens(siglip, "full") == 729
    with pytest.raises(LvitError, match="has none"):
        num_image_tokens(siglip, "default")


def test_a_larger_clip_gets_its_own_image_token_count(tmp_path):
    """CLIP at 1.5x the tiny size (as 336 px is to 224): 6 x 6 patches, CLS dropped, through assembly and processor."""
    from lvit.model.assemble import assemble
    from lvit.recipe.schema import ModelSection

    vision_dir, lm_dir = build_tiny_parts(tmp_path, vision={"image_size": 48})
    model, processor = assemble(ModelSection(vision_tower=str(vision_dir), language_model=str(lm_dir)))
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.image_seq_length == 36
    messages = chat_messages(Conversation([("user", Q1)], has_image=True), synthetic_image(48))
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["input_ids"][0].tolist().count(model.config.image_token_id) == 36
    with torch.no_grad():
        model(**inputs)  # LLaVA raises if features and image tokens differ


def test_an_image_processor_of_another_size_is_refused(tmp_path):
    from transformers import SiglipImageProcessor

    from lvit.model.processor import load_image_processor

    tower = build_tiny_siglip(tmp_path / "siglip")
    SiglipImageProcessor(size={"height": 48, "width": 48}).save_pretrained(tower)  # the tower is 32 px
    tokenizer = load_tokenizer(str(FIXTURES / "qwen3-tokenizer"))
    with pytest.raises(LvitError, match="yields 16 image features but its image processor makes 48 px"):
        build_processor(load_image_processor(tower), tokenizer, vision_config_of(str(tower)))


def test_naflex_siglip2_is_refused_with_the_fixed_resolution_alternative(tmp_path):
    from transformers import Siglip2Config

    Siglip2Config().save_pretrained(tmp_path)
    with pytest.raises(LvitError, match="siglip2-so400m-patch14-384"):
        vision_config_of(str(tmp_path))


def test_siglip_tower_uses_every_patch_feature(parts):
    """No CLS token: strategy "full", image tokens = patches, the processor expands <image> to as many, and the
    model's features fill them exactly (LLaVA raises on a count mismatch)."""
    from lvit.model.assemble import assemble
    from lvit.recipe.schema import ModelSection

    vision_dir, lm_dir = parts("llama3")
    assert "llama3" in SIGLIP
    model, processor = assemble(ModelSection(vision_tower=str(vision_dir), language_model=str(lm_dir)))
    cfg = model.config
    assert cfg.vision_config.model_type == "siglip_vision_model"
    assert cfg.vision_feature_select_strategy == "full"
    assert cfg.image_seq_length == num_image_tokens(cfg.vision_config) == (32 // 8) ** 2
    messages = chat_messages(Conversation([("user", Q1)], has_image=True), synthetic_image(32))
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["input_ids"][0].tolist().count(cfg.image_token_id) == 16
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"])
        out = model(**inputs)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    assert sum(f.shape[0] for f in features) == 16
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]


# --- end to end: stage 1 + stage 2 + export loaded by plain transformers ---------------------------------------


@pytest.fixture(scope="module")
def family_runs(parts, shapes_data, tmp_path_factory):
    """family -> (stage-1 run, stage-2 run, export folder), trained once per module on first use."""
    from lvit.export.exporter import export
    from lvit.train.run import run

    @functools.cache
    def get(family: str):
        recipes = TinyRecipes(parts(family), shapes_data, tmp_path_factory)
        root = tmp_path_factory.mktemp(f"run-{family}")
        align = run(recipes("align", out_dir=root / "align"))
        finetune = run(
            recipes("finetune", out_dir=root / "finetune", data__template="auto", model={"projector_from": str(align)})
        )
        out = root / "export"
        export(finetune, out, dtype="fp32")
        return align, finetune, out

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", list(LM_FAMILIES))
def test_family_trains_both_stages_and_exports_a_model_plain_transformers_runs(family, family_runs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    align, finetune, out = family_runs(family)
    assert (align / "projector.safetensors").exists()
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    cfg = model.config
    assert cfg.image_token_id < cfg.text_config.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert cfg.vision_feature_select_strategy == ("full" if family in SIGLIP else "default")
    end_id = processor.tokenizer.convert_tokens_to_ids(EXPECTED[family][0])
    eos = model.generation_config.eos_token_id
    assert end_id in (eos if isinstance(eos, list) else [eos])  # generation stops at the end of turn
    image = synthetic_image(cfg.vision_config.image_size)
    messages = chat_messages(Conversation([("user", Q1)], has_image=True), image)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["input_ids"][0].tolist().count(cfg.image_token_id) == num_image_tokens(cfg.vision_config)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


# --- the modern single-GPU recipe ------------------------------------------------------------------------------

MODERN = Path(__file__).resolve().parent.parent / "lvit" / "recipes" / "siglip2_qwen7b_qlora.yaml"


def _dry_run(*args):
    from typer.testing import CliRunner

    from lvit.cli.app import app

    return CliRunner().invoke(app, ["finetune", *args, "--dry-run"], catch_exceptions=False)


def test_modern_recipe_dry_run_passes_with_local_siglip_and_qwen_parts(parts, shapes_data, tmp_path):
    """The recipe as shipped, with tiny local parts of the same kinds (SigLIP, a padded-vocabulary Qwen with its
    chat template): every record is measured with the auto template and the SigLIP image-token count."""
    vision_dir, lm_dir = parts("qwen3")
    assert "qwen3" in SIGLIP
    result = _dry_run(
        str(MODERN),
        f"model.vision_tower={vision_dir}",
        f"model.language_model={lm_dir}",
        f"model.projector_from={tmp_path}",
        f"data.path={shapes_data['instruct']}",
        f"data.image_folder={shapes_data['images']}",
        f"training.output_dir={tmp_path / 'out'}",
    )
    assert result.exit_code == 0, result.output
    assert "records: 53 of 53 trainable" in result.output and "dry run passed" in result.output


@pytest.mark.slow
def test_a_siglip_stage1_run_exports_its_projector(family_runs, tmp_path):
    """--projector-only's self-check feeds the projector every SigLIP patch feature (strategy "full")."""
    from lvit.export.exporter import export

    align, _, _ = family_runs("llama3")
    assert "llama3" in SIGLIP
    result = export(align, tmp_path / "projector", projector_only=True)
    assert result.max_abs_diff <= result.tolerance
    assert (tmp_path / "projector" / "projector.safetensors").exists()
