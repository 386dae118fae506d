"""Conversation templates: exact token ids, exact loss masks, and the Jinja chat template's text."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
from conftest import trained_runs

from lvit.model.processor import build_processor, load_tokenizer
from lvit.model.towers import num_image_tokens
from lvit.templates.builtin import VICUNA_V1_CHAT_TEMPLATE, VICUNA_V1_SYSTEM
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Conversation
from lvit.templates.encoder import ConversationEncoder, get_template

# LLaVA's `conv_vicuna_v1.system` (llava/conversation.py), copied from there, not from lvit.
LLAVA_VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Q1, A1 = "What colour is the shape?", "red"
Q2, A2 = "Where is the shape?", "on the left"
Q3, A3 = "What shape is it?", "a blue circle"
CAPTION = "a red square on the left"
INSTRUCTION = "Give a brief description of the image."


@functools.cache
def _tokenizer(lm_dir: str):
    return load_tokenizer(lm_dir)


@functools.cache
def _n_image_tokens(vision_dir: str) -> int:
    from transformers import CLIPVisionConfig

    return num_image_tokens(CLIPVisionConfig.from_pretrained(vision_dir))


@pytest.fixture(params=["metaspace", "bytelevel"])
def parts(request):
    """(vision_dir, lm_dir) for each tokenizer style."""
    return request.getfixturevalue("tiny_parts" if request.param == "metaspace" else "tiny_parts_bytelevel")


@pytest.fixture
def tok(parts):
    return _tokenizer(str(parts[1]))


@pytest.fixture
def n_img(parts):
    return _n_image_tokens(str(parts[0]))


@pytest.fixture
def vicuna(tok, n_img):
    return ConversationEncoder("vicuna_v1", tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), n_img)


@pytest.fixture
def plain(tok, n_img):
    return ConversationEncoder("plain", tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), n_img)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def after_token(tok, text: str) -> list[int]:
    """The ids of `text` where it follows an added token (BOS, the image, EOS) in a whole conversation's text.

    A tokenizer whose Metaspace pre-tokenizer prepends "▁" only at the start of the input (`prepend_scheme`
    "first": the tiny metaspace one, non-legacy Llama) gives no "▁" there, so these differ from `ids(text)`.
    """
    return ids(tok, tok.eos_token + text)[1:]


def trained(enc) -> list[int]:
    return [label for label in enc.labels if label != IGNORE_INDEX]


def assert_labels_consistent(enc) -> None:
    assert len(enc.labels) == len(enc.input_ids)
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        assert label in (IGNORE_INDEX, token)


def image_conv(*qa: str, system: str | None = None) -> Conversation:
    turns = [
        (role, text) for q, a in zip(qa[::2], qa[1::2], strict=True) for role, text in (("user", q), ("assistant", a))
    ]
    return Conversation(turns=turns, has_image=True, system=system)


# ---------------------------------------------------------------------------------------------
# vicuna_v1


def test_system_prompt_is_llavas_vicuna_v1():
    assert VICUNA_V1_SYSTEM == LLAVA_VICUNA_V1_SYSTEM


def test_single_turn_trains_exactly_the_answer_and_eos(tok, vicuna):
    enc = vicuna.encode(image_conv(Q1, A1))
    expected = ids(tok, f" {A1}") + [tok.eos_token_id]
    assert trained(enc) == expected
    assert enc.input_ids[-len(expected) :] == expected  # the answer is the last thing in the sample
    assert_labels_consistent(enc)


@pytest.mark.parametrize("n_turns", [2, 3])
def test_multi_turn_trains_each_answer_and_its_eos_in_order(tok, vicuna, n_turns):
    qa = [Q1, A1, Q2, A2, Q3, A3][: 2 * n_turns]
    enc = vicuna.encode(image_conv(*qa))
    per_answer = [ids(tok, f" {a}") + [tok.eos_token_id] for a in qa[1::2]]
    assert trained_runs(enc.labels) == per_answer
    assert trained(enc) == [t for run in per_answer for t in run]
    assert_labels_consistent(enc)


def test_image_tokens_follow_system_and_user_role(tok, vicuna, n_img):
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    enc = vicuna.encode(image_conv(Q1, A1, Q2, A2))
    prefix = after_token(tok, f"{LLAVA_VICUNA_V1_SYSTEM} USER: ")
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.input_ids[1 : 1 + len(prefix)] == prefix
    start = 1 + len(prefix)
    assert enc.input_ids[start : start + n_img] == [image_id] * n_img
    assert enc.input_ids.count(image_id) == n_img
    assert enc.image_end == start + n_img
    assert all(label == IGNORE_INDEX for label in enc.labels[: enc.image_end])  # BOS, prompt, image: no loss
    # The whole sample, piece by piece: LLaVA's "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ...".
    eos = tok.eos_token_id
    assert enc.input_ids == (
        [tok.bos_token_id]
        + prefix
        + [image_id] * n_img
        + after_token(tok, f"\n{Q1} ASSISTANT:")
        + ids(tok, f" {A1}")
        + [eos]
        + after_token(tok, f"USER: {Q2} ASSISTANT:")
        + ids(tok, f" {A2}")
        + [eos]
    )


def test_answer_ids_match_whole_text_tokenization(tok, vicuna):
    """The answer ids are those LLaVA gets by tokenizing the whole prompt at once (no boundary artefacts)."""
    conv = image_conv(Q1, A1, Q2, A2, Q3, A3)
    enc = vicuna.encode(conv)
    text = "".join(_piece_text(tok, p) for p in vicuna.template.pieces(conv))
    whole = tok(text, add_special_tokens=False)["input_ids"]
    pos = 0
    for run in trained_runs(enc.labels):
        found = next((i for i in range(pos, len(whole) - len(run) + 1) if whole[i : i + len(run)] == run), None)
        assert found is not None, f"answer ids {run} not found in the whole-text tokenization"
        pos = found + len(run)


def test_text_only_conversation_has_no_image_tokens(tok, vicuna):
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    conv = Conversation(turns=[("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)])
    enc = vicuna.encode(conv)
    assert image_id not in enc.input_ids
    assert enc.image_end == 0
    eos = tok.eos_token_id
    assert enc.input_ids == (
        [tok.bos_token_id]
        + after_token(tok, f"{LLAVA_VICUNA_V1_SYSTEM} USER: {Q1} ASSISTANT:")
        + ids(tok, f" {A1}")
        + [eos]
        + after_token(tok, f"USER: {Q2} ASSISTANT:")
        + ids(tok, f" {A2}")
        + [eos]
    )
    assert trained_runs(enc.labels) == [ids(tok, f" {A1}") + [eos], ids(tok, f" {A2}") + [eos]]


def test_record_system_prompt_replaces_the_default(tok, vicuna, n_img):
    enc = vicuna.encode(image_conv(Q1, A1, system="Answer in one word."))
    prefix = after_token(tok, "Answer in one word. USER: ")
    assert enc.input_ids[1 : 1 + len(prefix)] == prefix
    assert enc.image_end == 1 + len(prefix) + n_img
    assert trained(enc) == ids(tok, f" {A1}") + [tok.eos_token_id]


def test_encode_many_equals_encode(vicuna, plain):
    convs = [
        image_conv(Q1, A1),
        Conversation(turns=[("user", Q2), ("assistant", A2)]),
        image_conv(Q1, A1, Q2, A2, Q3, A3),
        image_conv(Q2, A2, system="Be brief."),
    ]
    assert vicuna.encode_many(convs) == [vicuna.encode(c) for c in convs]
    captions = [image_conv(INSTRUCTION, CAPTION), Conversation(turns=[("user", INSTRUCTION), ("assistant", A3)])]
    assert plain.encode_many(captions) == [plain.encode(c) for c in captions]
    assert vicuna.encode_many([]) == []


def test_lengths_equal_the_encoded_lengths(vicuna, plain):
    """`lengths` (what `lvit data check` and training's checks measure) is `encode` in numbers, ids not built."""
    convs = [
        image_conv(Q1, A1),
        Conversation(turns=[("user", Q2), ("assistant", A2)]),
        image_conv(Q1, A1, Q2, A2, Q3, A3),
        image_conv(Q2, A2, system="Be brief."),
        image_conv(Q1, A1, Q1, A1),  # repeated pieces are tokenized once, counted twice
    ]
    for encoder in (vicuna, plain):
        lengths = encoder.lengths(convs)
        for i, conv in enumerate(convs):
            if i in lengths.rejected:  # plain: one caption per record
                assert encoder is plain and len(conv.turns) > 2 and "exactly one caption" in lengths.rejected[i]
                with pytest.raises(ValueError, match="exactly one caption"):
                    encoder.encode(conv)
                continue
            enc = encoder.encode(conv)
            got = (lengths.total[i], lengths.image_end[i], lengths.first_trained[i])
            assert got == (len(enc.input_ids), enc.image_end, enc.first_trained), (encoder.template.name, i)
    assert set(plain.lengths(convs).rejected) == {2, 4} and vicuna.lengths(convs).rejected == {}
    assert vicuna.lengths([]).total == []


def test_generation_prompt_ends_with_assistant_and_trains_nothing(tok, vicuna):
    enc = vicuna.encode(image_conv(Q1, A1))
    prompt = vicuna.encode(Conversation(turns=[("user", Q1)], has_image=True), for_generation=True)
    tail = ids(tok, " ASSISTANT:")
    assert prompt.input_ids[-len(tail) :] == tail
    assert trained(prompt) == []
    assert prompt.first_trained == len(prompt.input_ids)
    # The generation prompt is exactly the training sample up to its answer: same ids at inference.
    assert prompt.input_ids == enc.input_ids[: enc.first_trained]


def test_generation_prompt_after_history_matches_training_prefix(tok, vicuna):
    full = vicuna.encode(image_conv(Q1, A1, Q2, A2))
    prompt = vicuna.encode(
        Conversation(turns=[("user", Q1), ("assistant", A1), ("user", Q2)], has_image=True), for_generation=True
    )
    last_answer = ids(tok, f" {A2}") + [tok.eos_token_id]
    assert prompt.input_ids == full.input_ids[: -len(last_answer)]
    assert prompt.input_ids[-len(ids(tok, " ASSISTANT:")) :] == ids(tok, " ASSISTANT:")


# ---------------------------------------------------------------------------------------------
# plain


def test_plain_trains_caption_and_eos_and_drops_the_instruction(tok, plain, n_img):
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    enc = plain.encode(image_conv(INSTRUCTION, CAPTION))
    caption = after_token(tok, CAPTION) + [tok.eos_token_id]
    assert enc.input_ids == [tok.bos_token_id] + [image_id] * n_img + caption
    assert enc.labels == [IGNORE_INDEX] * (1 + n_img) + caption
    assert enc.image_end == 1 + n_img
    assert trained(enc) == caption


def test_plain_generation_prompt_is_bos_and_image(tok, plain, n_img):
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    enc = plain.encode(Conversation(turns=[("user", INSTRUCTION)], has_image=True), for_generation=True)
    assert enc.input_ids == [tok.bos_token_id] + [image_id] * n_img
    assert trained(enc) == []


def test_plain_rejects_two_captions(plain):
    with pytest.raises(ValueError, match="exactly one caption.*got 2"):
        plain.encode(image_conv(INSTRUCTION, CAPTION, INSTRUCTION, A3))


def test_unknown_template_and_tokenizer_without_eos():
    with pytest.raises(ValueError, match="unknown template 'llama3'.*vicuna_v1.*plain"):
        get_template("llama3")
    with pytest.raises(ValueError, match="no EOS token"):
        ConversationEncoder("vicuna_v1", SimpleNamespace(eos_token_id=None), 5, 4)


# ---------------------------------------------------------------------------------------------
# the Jinja chat template (for users of plain transformers)


def _piece_text(tok, piece) -> str:
    return {"bos": tok.bos_token, "eos": tok.eos_token, "image": IMAGE_PLACEHOLDER}.get(piece.kind, piece.text)


def _messages(conv: Conversation, system_as_list: bool = False) -> list[dict]:
    msgs = []
    if conv.system is not None:
        content = [{"type": "text", "text": conv.system}] if system_as_list else conv.system
        msgs.append({"role": "system", "content": content})
    for i, (role, text) in enumerate(conv.turns):
        if i == 0 and conv.has_image:
            msgs.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            msgs.append({"role": role, "content": text})
    return msgs


CHAT_CASES = {
    "image-single": image_conv(Q1, A1),
    "image-multi": image_conv(Q1, A1, Q2, A2, Q3, A3),
    "text-only": Conversation(turns=[("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)]),
    "system": image_conv(Q1, A1, system="Answer in one word."),
    "generation": Conversation(turns=[("user", Q1), ("assistant", A1), ("user", Q2)], has_image=True),
    "generation-text": Conversation(turns=[("user", Q1)]),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_template_renders_the_template_pieces(tok, vicuna, case):
    conv = CHAT_CASES[case]
    expected = "".join(_piece_text(tok, p) for p in vicuna.template.pieces(conv))
    rendered = tok.apply_chat_template(_messages(conv), tokenize=False, chat_template=VICUNA_V1_CHAT_TEMPLATE)
    assert rendered == expected
    if conv.system is not None:
        as_list = _messages(conv, system_as_list=True)
        assert tok.apply_chat_template(as_list, tokenize=False, chat_template=VICUNA_V1_CHAT_TEMPLATE) == expected


def test_processor_chat_template_is_vicuna_v1(tiny_parts):
    """The processor lvit saves carries the template, so `processor.apply_chat_template` gives the training text."""
    from transformers import AutoImageProcessor, CLIPVisionConfig

    vision_dir, lm_dir = tiny_parts
    tok = _tokenizer(str(lm_dir))
    vision_config = CLIPVisionConfig.from_pretrained(vision_dir)
    processor = build_processor(AutoImageProcessor.from_pretrained(vision_dir), tok, vision_config)
    encoder = ConversationEncoder("vicuna_v1", tok, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER), 4)
    for conv in CHAT_CASES.values():
        expected = "".join(_piece_text(tok, p) for p in encoder.template.pieces(conv))
        assert processor.apply_chat_template(_messages(conv), tokenize=False) == expected
