"""`data.template: auto`: the language model's own chat template (Llama 3, Qwen, Mistral, Gemma...) as an
lvit template.

The conversation is rendered by the LM's Jinja chat template, the text the exported processor's
`apply_chat_template` renders, and the trained character spans are found without markers, by rendering
prefixes of the same conversation:

- before the k-th answer, the template's generation prompt for the conversation up to that answer,
  `render(messages[:j], add_generation_prompt=True)`, must be a prefix of the whole conversation's
  text: what the model is shown when asked the k-th question is exactly what precedes that answer in
  training. A template that renders earlier turns differently once more turns follow (Mistral v0.3
  moves the system prompt into the last user turn, for one) fails this and is refused with the place
  where the two texts part;
- the k-th trained span runs from the end of that prefix (what the model must generate, the answer as
  the template renders it) up to and including the template's end-of-turn token (`<|eot_id|>`,
  `<|im_end|>`, `<end_of_turn>`, `</s>`): the first special token after the answer text, the same for
  every turn. Text the template puts between the generation prompt and the answer is part of what the
  model generates, and trained (Qwen3's empty `<think>` block before its last answer); what follows the
  end-of-turn token (a newline, the next role header) is not.

So system text, user turns, role headers, the image and padding are never trained, and the ids equal
`processor.apply_chat_template(..., tokenize=True)`'s by construction: the text is the same, and
`lvit.templates.encoder.ConversationEncoder` tokenizes it as the processor does.

The image: LM chat templates know no image items, so the template lvit renders and exports is the LM's
with a prologue that turns each message whose content is a list of items (`{"type": "image"}`,
`{"type": "text", ...}`) into a string, each image item becoming `<image>\\n`: with one image in the
conversation it goes first in its message (LLaVA's placement), with several each stays where it stands
among the parts (as vicuna_v1's template does). String contents pass through untouched.
"""

from __future__ import annotations

from lvit.errors import LvitError
from lvit.templates.builtin import Template
from lvit.templates.conversation import IMAGE_PLACEHOLDER, Conversation, Rendered, chat_messages

_MARK = "{#- lvit: list contents -> '<image>\\n' per image item + the text items -#}"
_PROLOGUE = (
    _MARK + "{%- set lvit_ns = namespace(messages=[], images=0) -%}"
    "{%- for m in messages if m['content'] is not string -%}"
    "{%- set lvit_ns.images = lvit_ns.images"
    " + (m['content'] | selectattr('type', 'equalto', 'image') | list | length) -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set lvit_ns.messages = lvit_ns.messages + [m] -%}"
    "{%- else -%}{%- set lvit_text = namespace(s='') -%}"
    "{%- if lvit_ns.images > 1 -%}"  # several images: each where it stands among the parts
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set lvit_text.s = lvit_text.s + '" + IMAGE_PLACEHOLDER + "\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set lvit_text.s = lvit_text.s + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"  # one image: first in its message, as LLaVA places it
    "{%- for item in m['content'] if item['type'] == 'image' -%}"
    "{%- set lvit_text.s = lvit_text.s + '" + IMAGE_PLACEHOLDER + "\\n' -%}{%- endfor -%}"
    "{%- for item in m['content'] if item['type'] == 'text' -%}"
    "{%- set lvit_text.s = lvit_text.s + item['text'] -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- set lvit_ns.messages = lvit_ns.messages + [{'role': m['role'], 'content': lvit_text.s}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = lvit_ns.messages %}"
)

_REFUSES = "the chat template refuses the conversation"

# Conversations the template is tried on when it is chosen, so a template lvit cannot split is refused
# before any data is read (with and without an image, one and two exchanges, with a system prompt).
_PROBES = [
    Conversation([("user", "What is it?"), ("assistant", "A red square.")], has_image=True),
    Conversation(
        [("user", "What is it?"), ("assistant", "A red square."), ("user", "Where?"), ("assistant", "Top left.")],
        has_image=True,
    ),
    Conversation(
        [("user", "Hello."), ("assistant", "Hi."), ("user", "Bye."), ("assistant", "Bye.")], system="Be brief."
    ),
]


def exported_chat_template(tokenizer) -> str:
    """The chat template lvit trains with and exports for `data.template: auto`: the tokenizer's own, with
    the image prologue (once: a template lvit saved already has it)."""
    raw = tokenizer.chat_template
    if isinstance(raw, dict):  # several named templates: the default one
        raw = raw.get("default")
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not raw:
        raise LvitError(
            f"data.template auto: the tokenizer of {name!r} has no chat template (a base model?); use "
            "data.template vicuna_v1 (or plain), or give the tokenizer a chat template (`chat_template` in its "
            "tokenizer_config.json / chat_template.jinja)."
        )
    return raw if raw.startswith(_MARK) else _PROLOGUE + raw


class LMChatTemplate(Template):
    """The LM tokenizer's chat template as an lvit template (see the module docstring). Built per tokenizer;
    refuses (`LvitError`, with the reason) a template it cannot split exactly."""

    name = "auto"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = exported_chat_template(tokenizer)
        self._where = f"data.template auto ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__})"
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials |= set(tokenizer.all_special_tokens)
        self._specials = sorted(specials - {IMAGE_PLACEHOLDER}, key=len, reverse=True)
        self.end_of_turn: str | None = None
        self._probing = True
        rendered = []
        for conv in _PROBES:
            try:
                rendered.append(self.render(conv))
            except ValueError as exc:
                if conv.system is not None and str(exc).startswith(_REFUSES):
                    continue  # a template without system prompts (Mistral v0.1): such records are refused one by one
                raise LvitError(f"{self._where}: the LM's chat template cannot be used for training: {exc}") from None
        self._probing = False
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        bos = tokenizer.bos_token
        if not (bos and rendered[0].text.startswith(bos)):
            added = (
                tokenizer("a", add_special_tokens=True)["input_ids"]
                != tokenizer("a", add_special_tokens=False)["input_ids"]
            )
            if added:
                raise LvitError(
                    f"{self._where}: the chat template's text does not start with the BOS token {bos!r}, so "
                    "`processor.apply_chat_template(..., tokenize=True)` lets the tokenizer add its special tokens, "
                    "and the tokenizer does add some: lvit cannot make training ids that equal the processor's. "
                    "Use a template that starts with `{{ bos_token }}`."
                )

    def pieces(self, conv: Conversation, for_generation: bool = False):
        raise NotImplementedError("the LM's chat template renders the whole text; use render()")

    def _render(self, messages: list[dict], generation: bool) -> str:
        # the text the processor renders at inference (docs/stack-notes.md#chat-template-rendering)
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.text, tokenize=False, add_generation_prompt=generation
            )
        except Exception as exc:  # jinja's TemplateError (the template's raise_exception), a missing key...
            raise ValueError(f"{_REFUSES}: {exc}") from None

    def render(self, conv: Conversation, for_generation: bool = False, bos: str = "", eos: str = "") -> Rendered:
        messages = chat_messages(conv)
        if for_generation:
            text = self._render(messages, True)
            return Rendered(text, [], self._images(text, conv))
        whole = self._render(messages, False)
        spans: list[tuple[int, int]] = []
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            k = len(spans) + 1
            prefix = self._render(messages[:j], True)
            if not whole.startswith(prefix):
                at = next((i for i, (a, b) in enumerate(zip(prefix, whole, strict=False)) if a != b), len(whole))
                raise ValueError(
                    f"the template renders the conversation before answer {k} differently when more turns follow "
                    f"(the generation prompt has {prefix[at : at + 40]!r} where the whole conversation has "
                    f"{whole[at : at + 40]!r}), so the model would be asked in another text than it was trained on"
                )
            start = len(prefix)
            answer = message["content"].strip()
            at = whole.find(answer, start)
            if at < 0:
                raise ValueError(
                    f"answer {k} ({answer[:40]!r}) does not appear in the template's text after its generation prompt "
                    "(the template rewrites answers), so its tokens cannot be labelled"
                )
            end = self._end_of_turn(whole, at + len(answer), k)
            if self.end_of_turn in whole[start:at]:
                raise ValueError(f"answer {k} is rendered after the end of its own turn; the template is not a chat")
            spans.append((start, end))
        return Rendered(whole, spans, self._images(whole, conv))

    def _end_of_turn(self, text: str, after: int, k: int) -> int:
        """The end of the end-of-turn token that closes the answer ending at `after`: the first special token
        after it. While the probes run, every special token is looked for and the same one must close every
        turn; after that, the one found."""
        if not self._probing:
            at = text.find(self.end_of_turn, after)
            if at < 0:
                raise ValueError(f"answer {k} is not followed by the end-of-turn token {self.end_of_turn!r}")
            return at + len(self.end_of_turn)
        found = [(text.find(s, after), s) for s in self._specials]
        found = [(at, s) for at, s in found if at >= 0]
        if not found:
            raise ValueError(f"answer {k} is followed by no special token, so generation could not stop at its end")
        at, token = min(found, key=lambda f: (f[0], -len(f[1])))
        if self.end_of_turn is not None and token != self.end_of_turn:
            raise ValueError(
                f"answer {k} ends with {token!r} where an earlier one ends with {self.end_of_turn!r}; lvit needs one "
                "end-of-turn token"
            )
        self.end_of_turn = token
        return at + len(token)

    def _images(self, text: str, conv: Conversation) -> list[int]:
        """Where each image placeholder starts in the rendered text (one per image of the conversation)."""
        found, at = [], text.find(IMAGE_PLACEHOLDER)
        while at >= 0:
            found.append(at)
            at = text.find(IMAGE_PLACEHOLDER, at + len(IMAGE_PLACEHOLDER))
        if len(found) != conv.num_images:
            raise ValueError(
                f"the chat template's text has {len(found)} image placeholder(s) {IMAGE_PLACEHOLDER!r} for "
                f"{conv.num_images} image(s)"
            )
        return found
