"""Training ids == the ids plain transformers builds with the exported processor, for every tokenizer.

The processor is lvit's own (`lvit.model.processor.build_processor`: the vicuna_v1 chat template, the image token
count), saved with `save_pretrained` and loaded back with `AutoProcessor.from_pretrained`, as a user of the
export (or vLLM) gets it; no model weights are involved. Tokenizers: LLaMA-2's real one
(`tests/fixtures/llama2-tokenizer`) loaded three ways, and lvit's tiny metaspace and byte-level ones.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
from conftest import trained_runs

from lvit.export.selfcheck import synthetic_image
from lvit.model.processor import build_processor, load_tokenizer
from lvit.templates.builtin import PLAIN_CHAT_TEMPLATE
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Conversation, chat_messages
from lvit.templates.encoder import ConversationEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "llama2-tokenizer"
LLAMA2 = ["llama2-legacy", "llama2-nonlegacy", "llama2-generic"]
TOKENIZERS = [*LLAMA2, "tiny-metaspace", "tiny-bytelevel"]

Q1, A1 = "What colour is the shape?", "red"
Q2, A2 = "Where is the shape?", "on the left"
Q3, A3 = "What shape is it?", "a blue circle"
CAPTION = "a red square on the left"

CASES = {
    "image-single": Conversation([("user", Q1), ("assistant", A1)], has_image=True),
    "image-multi": Conversation(
        [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2), ("user", Q3), ("assistant", A3)],
        has_image=True,
    ),  # fmt: skip
    "text-single": Conversation([("user", Q1), ("assistant", A1)]),
    "text-multi": Conversation([("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)]),
    "system": Conversation([("user", Q1), ("assistant", A1)], has_image=True, system="Answer in one word."),
    "system-multi": Conversation(
        [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)], system="Be brief.\nVery brief."
    ),  # fmt: skip
    "odd-text": Conversation([("user", "  naïve café — 東京?\n"), ("assistant", "\n two  spaces ")], has_image=True),
}


def _llama2_variant(root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(FIXTURE, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if name == "llama2-nonlegacy":
        del config["legacy"]  # as Vicuna v1.5's config: transformers 5 builds the non-legacy tokenizer
    elif name == "llama2-generic":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the generic fast backend
    config_file.write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory, tiny_parts, tiny_parts_bytelevel) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama2-tokenizers")
    dirs = {name: _llama2_variant(root, name) for name in LLAMA2}
    dirs["tiny-metaspace"], dirs["tiny-bytelevel"] = tiny_parts[1], tiny_parts_bytelevel[1]
    return dirs


@functools.cache
def _setup(lm_dir: str, vision_dir: str, export_dir: str):
    """(training tokenizer, exported processor reloaded from disk, image tokens per image)."""
    from transformers import AutoImageProcessor, AutoProcessor, CLIPVisionConfig

    from lvit.model.towers import num_image_tokens

    tokenizer = load_tokenizer(lm_dir)
    vision_config = CLIPVisionConfig.from_pretrained(vision_dir)
    processor = build_processor(AutoImageProcessor.from_pretrained(vision_dir), tokenizer, vision_config)
    processor.save_pretrained(export_dir)
    return tokenizer, AutoProcessor.from_pretrained(export_dir), num_image_tokens(vision_config)


@pytest.fixture(params=TOKENIZERS)
def setup(request, tokenizer_dirs, tiny_parts, tmp_path_factory):
    name = request.param
    export_dir = tmp_path_factory.getbasetemp() / f"export-{name}"
    tokenizer, processor, n_img = _setup(str(tokenizer_dirs[name]), str(tiny_parts[0]), str(export_dir))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return name, tokenizer, processor, n_img, image_id


def inference_ids(processor, conv: Conversation, **kwargs) -> list[int]:
    image = synthetic_image(processor.image_processor.crop_size["height"]) if conv.has_image else None
    ids = processor.apply_chat_template(chat_messages(conv, image), tokenize=True, **kwargs)
    assert len(ids) == 1  # one conversation, as a batch of one
    return list(ids[0])


def answers(conv: Conversation) -> list[str]:
    return [text for role, text in conv.turns if role == "assistant"]


@pytest.mark.parametrize("case", list(CASES))
def test_training_ids_are_the_chat_template_ids(setup, case):
    name, tokenizer, processor, n_img, image_id = setup
    conv = CASES[case]
    enc = ConversationEncoder("vicuna_v1", tokenizer, image_id, n_img).encode(conv)
    assert enc.input_ids == inference_ids(processor, conv)
    assert enc.input_ids.count(image_id) == (n_img if conv.has_image else 0)
    assert enc.input_ids[0] == tokenizer.bos_token_id
    # the trained span is exactly each answer and its </s>: nothing of the prompt, nothing after
    runs = trained_runs(enc.labels)
    assert [run[-1] for run in runs] == [tokenizer.eos_token_id] * len(answers(conv))
    for run, answer in zip(runs, answers(conv), strict=True):
        text = tokenizer.decode(run[:-1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text.strip() == answer.strip(), (name, run)
    for i, label in enumerate(enc.labels):  # a trained token's label is the token, the prompt is never trained
        assert label in (IGNORE_INDEX, enc.input_ids[i])
    starts = [i for i in range(len(enc.labels)) if enc.labels[i] != IGNORE_INDEX and enc.labels[i - 1] == IGNORE_INDEX]
    for start in starts:
        prompt = tokenizer.decode(enc.input_ids[:start], skip_special_tokens=False)
        assert prompt.endswith("ASSISTANT:")


@pytest.mark.parametrize("case", ["image-single", "image-multi", "text-multi", "system"])
def test_generation_prompt_ids_are_the_chat_template_ids(setup, case):
    name, tokenizer, processor, n_img, image_id = setup
    full = CASES[case]
    encoder = ConversationEncoder("vicuna_v1", tokenizer, image_id, n_img)
    prompt = Conversation(full.turns[:-1], full.has_image, full.system)  # up to the last question
    enc = encoder.encode(prompt, for_generation=True)
    assert enc.input_ids == inference_ids(processor, prompt, add_generation_prompt=True)
    assert set(enc.labels) == {IGNORE_INDEX}
    # the model is asked exactly as it was trained: the training sample's ids up to its last answer
    trained = encoder.encode(full)
    last_answer = trained_runs(trained.labels)[-1]
    assert enc.input_ids == trained.input_ids[: -len(last_answer)]


def test_plain_template_ids_are_the_plain_chat_template_ids(setup):
    """Stage 1's `plain` (BOS, image, caption, EOS) against `PLAIN_CHAT_TEMPLATE`: lvit's definition of it."""
    name, tokenizer, processor, n_img, image_id = setup
    encoder = ConversationEncoder("plain", tokenizer, image_id, n_img)
    conv = Conversation([("user", "Give a brief description of the image."), ("assistant", CAPTION)], has_image=True)
    enc = encoder.encode(conv)
    assert enc.input_ids == inference_ids(processor, conv, chat_template=PLAIN_CHAT_TEMPLATE)
    assert enc.input_ids[: 1 + n_img] == [tokenizer.bos_token_id] + [image_id] * n_img
    caption = enc.input_ids[1 + n_img :]
    assert enc.labels == [IGNORE_INDEX] * (1 + n_img) + caption and caption[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(caption[:-1]).strip() == CAPTION
    prompt = Conversation(conv.turns[:1], has_image=True)
    gen = encoder.encode(prompt, for_generation=True)
    assert gen.input_ids == [tokenizer.bos_token_id] + [image_id] * n_img
    kwargs = {"chat_template": PLAIN_CHAT_TEMPLATE, "add_generation_prompt": True}
    assert gen.input_ids == inference_ids(processor, prompt, **kwargs)


def test_lengths_equal_encode(setup):
    name, tokenizer, processor, n_img, image_id = setup
    convs = list(CASES.values())
    for template in ("vicuna_v1", "plain"):
        encoder = ConversationEncoder(template, tokenizer, image_id, n_img)
        lengths = encoder.lengths(convs)
        for i, conv in enumerate(convs):
            if i in lengths.rejected:
                assert template == "plain" and len(answers(conv)) != 1
                continue
            enc = encoder.encode(conv)
            assert (lengths.total[i], lengths.image_end[i], lengths.first_trained[i]) == (
                len(enc.input_ids), enc.image_end, enc.first_trained,
            ), (template, i)  # fmt: skip


# --- what differs between the three loadings of LLaMA-2's tokenizer, with the real vocabulary -------------


def _tokens(setup, conv: Conversation) -> list[str]:
    _, tokenizer, _, n_img, image_id = setup
    enc = ConversationEncoder("vicuna_v1", tokenizer, image_id, n_img).encode(conv)
    return tokenizer.convert_ids_to_tokens(enc.input_ids)


@pytest.mark.parametrize("name", LLAMA2)
def test_llama2_tokens_at_the_places_where_loadings_differ(tokenizer_dirs, tiny_parts, tmp_path_factory, name):
    export_dir = tmp_path_factory.getbasetemp() / f"export-{name}"
    tokenizer, processor, n_img = _setup(str(tokenizer_dirs[name]), str(tiny_parts[0]), str(export_dir))
    setup = (name, tokenizer, processor, n_img, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    tokens = _tokens(setup, CASES["image-multi"])
    image_end = tokens.index("<s>") + 1 + tokens[1:].index(IMAGE_PLACEHOLDER) + n_img
    legacy = name != "llama2-nonlegacy"  # the generic backend runs tokenizer.json, which prepends as legacy does
    assert tokens[:2] == ["<s>", "▁A" if legacy else "A"]  # after BOS
    assert tokens[image_end : image_end + 2] == (["▁", "<0x0A>"] if legacy else ["<0x0A>", "What"])  # after the image
    eos = tokens.index("</s>")
    assert tokens[eos + 1 : eos + 4] == (["▁US", "ER", ":"] if legacy else ["USER", ":", "▁Where"])  # after </s>
    # the answers, the same in all three: no stray "▁" before an answer (the generic backend gave one when
    # the answer " red" was tokenized on its own)
    answer_tokens = [["▁red"], ["▁on", "▁the", "▁left"], ["▁a", "▁blue", "▁circle"]]
    enc = ConversationEncoder("vicuna_v1", tokenizer, setup[4], n_img).encode(CASES["image-multi"])
    runs = trained_runs(enc.labels)
    assert [tokenizer.convert_ids_to_tokens(run) for run in runs] == [[*t, "</s>"] for t in answer_tokens]


def test_a_legacy_llama_tokenizer_survives_save_and_reload(tokenizer_dirs, tmp_path):
    """transformers 5.24 drops `legacy` when saving; `load_tokenizer` keeps it, and refuses a tokenizer that
    would still tokenize differently once saved and reloaded (as the run and the export save it)."""
    from transformers import AutoTokenizer

    from lvit.errors import LvitError
    from lvit.model.processor import check_round_trip

    tokenizer = load_tokenizer(str(tokenizer_dirs["llama2-legacy"]))
    tokenizer.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["legacy"] is True
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").legacy is True

    plain = AutoTokenizer.from_pretrained(tokenizer_dirs["llama2-legacy"])  # without lvit's fix
    assert plain.legacy is True
    with pytest.raises(LvitError, match="tokenizes differently after save_pretrained and from_pretrained"):
        check_round_trip(plain, "llama2-legacy")
