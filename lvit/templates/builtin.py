"""lvit's own templates (LLaVA's vicuna_v1 and plain): the pieces of a conversation, and the Jinja chat templates
that render the same text in plain transformers."""

from __future__ import annotations

from lvit.templates.conversation import IMAGE_PLACEHOLDER, Conversation, Piece, Rendered, render, user_pieces

# Source: LLaVA `llava/conversation.py`, `conv_vicuna_v1` (system prompt, roles USER/ASSISTANT,
# separators " " and "</s>"); the same text is quoted in the LLaVA paper's Table 2 set-up.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class Template:
    """Base class: subclasses say which pieces a conversation is made of."""

    name: str

    def pieces(self, conv: Conversation, for_generation: bool = False) -> list[Piece]:
        raise NotImplementedError

    def render(self, conv: Conversation, for_generation: bool = False, bos: str = "", eos: str = "") -> Rendered:
        """The conversation's text and trained spans (`pieces` joined with the tokenizer's BOS and EOS)."""
        return render(self.pieces(conv, for_generation), bos, eos)


class VicunaV1(Template):
    """LLaVA's `vicuna_v1`: "{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ..."

    Loss covers each assistant answer and the EOS that ends it; the system prompt, the user turns,
    the role names and the image are never trained.
    """

    name = "vicuna_v1"

    def pieces(self, conv: Conversation, for_generation: bool = False) -> list[Piece]:
        system = VICUNA_V1_SYSTEM if conv.system is None else conv.system
        out = [Piece("bos")]
        for i, (role, text) in enumerate(conv.turns):
            if role == "user":
                lead = f"{system} USER: " if i == 0 else "USER: "
                if i == 0 and conv.has_image and not conv.images_inline:
                    out += [Piece("text", lead), Piece("image"), Piece("text", f"\n{text} ASSISTANT:")]
                elif IMAGE_PLACEHOLDER in text:  # several images, each where its placeholder is
                    out += [Piece("text", lead), *user_pieces(text), Piece("text", " ASSISTANT:")]
                else:
                    out.append(Piece("text", f"{lead}{text} ASSISTANT:"))
            else:
                out += [Piece("text", f" {text}", trained=True), Piece("eos", trained=True)]
        return out


class Plain(Template):
    """LLaVA-1.5's `plain` stage-1 template: the image, then the caption, then EOS.

    The user turn (the instruction) is dropped; only the first assistant turn (the caption) is
    used and trained on. LLaVA ends a plain sample with "\\n"; lvit ends it with EOS so that the
    end-of-turn token is the same in both templates.
    """

    name = "plain"

    def pieces(self, conv: Conversation, for_generation: bool = False) -> list[Piece]:
        out = [Piece("bos")] + [Piece("image")] * conv.num_images
        answers = [text for role, text in conv.turns if role == "assistant"]
        if for_generation:
            return out
        if len(answers) != 1:
            raise ValueError(
                f"the 'plain' template takes exactly one caption (assistant turn) per record, got {len(answers)}; "
                "use template vicuna_v1 for multi-turn data"
            )
        return out + [Piece("text", answers[0], trained=True), Piece("eos", trained=True)]


TEMPLATES: dict[str, Template] = {t.name: t for t in (VicunaV1(), Plain())}
AUTO = "auto"
"""`data.template: auto`: the language model's own chat template (`lvit.templates.chat_template.LMChatTemplate`)."""


# A Jinja chat template that renders the vicuna_v1 text, for `processor.apply_chat_template` in
# plain transformers. Each image renders as "<image>\n": in a conversation with one image it is placed first
# in its message; in one with several (a multi-image record) every message's parts stay in their order.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set system = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'][0]['text'] -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}{%- endif -%}"
    "{%- set ns = namespace(images=0) -%}"
    "{%- for message in messages if message['content'] is not string -%}"
    "{%- set ns.images = ns.images + (message['content'] | selectattr('type', 'equalto', 'image') | list | length) -%}"
    "{%- endfor -%}"
    "{{- bos_token + system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' ' if loop.first else '') + 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif ns.images > 1 -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- ' ASSISTANT:' -}}"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] + eos_token -}}"
    "{%- else -%}{{- ' ' + message['content'][0]['text'] + eos_token -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# The `plain` template (stage 1) as a Jinja chat template: BOS, the image of the user message (its text
# is dropped, as `Plain` drops the instruction), the assistant's caption and EOS. lvit's own definition
# (LLaVA has no chat template for it). The processor lvit saves carries the vicuna_v1 template; pass
# this one as `chat_template=` to get a stage-1 model's inputs from plain transformers.
PLAIN_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['content'] is string -%}{{- message['content'] + eos_token -}}"
    "{%- else -%}{{- message['content'][0]['text'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

CHAT_TEMPLATES = {"vicuna_v1": VICUNA_V1_CHAT_TEMPLATE, "plain": PLAIN_CHAT_TEMPLATE}
"""The Jinja chat template that renders each lvit template's text."""
