"""Conversation templates: how a conversation becomes token ids and loss labels.

The ids a model is trained on are the ids it is given at inference, by lvit or by plain
`transformers` (`processor.apply_chat_template(..., tokenize=True)`, and so vLLM), for every
tokenizer lvit accepts. So a conversation is never tokenized piece by piece: a template says which
pieces it is made of (text, the image, BOS, EOS; each trained or not), the pieces are joined into
the one string the exported chat template renders (`VICUNA_V1_CHAT_TEMPLATE`, `PLAIN_CHAT_TEMPLATE`),
and that string is tokenized once, as the processor tokenizes it: no special tokens added (it starts
with BOS, so the processor adds none), BOS, EOS and `<image>` read as the added tokens they are, the
one `<image>` then expanded to the image's tokens (the processor expands the text to `<image>` x N
first; `<image>` being an added token, the ids are the same). Per piece tokenization differs from
this where a tokenizer's output depends on what precedes a piece: a non-legacy Llama tokenizer adds
no "▁" after an added token (after BOS, after the image, after `</s>`), and a SentencePiece model
loaded through the generic fast backend turns a piece's leading space into a stray "▁".

Labels come from character spans: each answer and its EOS is a span of the text, and a token is
trained when it starts inside one, read from the fast tokenizer's offsets. A token across a span's
edge (the answer's first token merged with the text before it) cannot be labelled; the conversation
is refused (`ValueError`, as for any conversation a template refuses; `lvit data check` lists it).

`data.template: auto` is the language model's own chat template (`lvit.templates.chat_template.LMChatTemplate`): it
renders the whole text itself (`Template.render`) and finds the trained spans by rendering prefixes of the
conversation; the rest (one tokenization, labels from offsets, the image expanded) is the same.

`ConversationEncoder.lengths` gives the numbers `encode` would give (length, end of the image,
first trained token) without building the Python id lists: `lvit data check` and training's
up-front checks measure every sample with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Conversation:
    """A normalised conversation: alternating user/assistant turns, image placeholders removed."""

    turns: list[tuple[str, str]]
    """(role, text) with role "user" or "assistant", starting with "user"."""
    has_image: bool = False
    """Whether the sample has an image. With one image (no placeholder left in the text) it goes at the
    start of the first user turn; with several, each `<image>` left in the user turns' text (followed by
    "\n", `lvit.data.records` normalises it so) is where its image goes."""
    system: str | None = None
    """Overrides the template's system prompt when set."""
    image_tokens: tuple[int, ...] | None = None
    """How many image tokens each image takes, in order, where that depends on the image (LLaVA-NeXT's AnyRes:
    `lvit.model.next.image_tokens`); None: the encoder's fixed count for every image."""

    @property
    def num_images(self) -> int:
        """How many images the sample has: the placeholders in its user turns, else one when `has_image`."""
        if not self.has_image:
            return 0
        return sum(text.count(IMAGE_PLACEHOLDER) for role, text in self.turns if role == "user") or 1

    @property
    def images_inline(self) -> bool:
        """Whether the images stand where their placeholders are in the text (a sample with several)."""
        return self.has_image and any(IMAGE_PLACEHOLDER in text for role, text in self.turns if role == "user")


@dataclass
class Piece:
    kind: str  # "text" | "image" | "bos" | "eos"
    text: str = ""
    trained: bool = False


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image_end: int = 0
    """Index just past the last image token (0 when there is no image)."""
    text: str = field(default="", repr=False)
    """The rendered text that was tokenized (one `<image>` for each image)."""

    @property
    def first_trained(self) -> int:
        """Index of the first token that carries loss, or len(input_ids) when none does."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.labels))


@dataclass
class Lengths:
    """Per conversation, as `ConversationEncoder.encode` would build it: the number of tokens (image
    tokens included, `len(input_ids)`), the index just past the image (`image_end`) and the index of
    the first trained token (`first_trained`)."""

    total: list[int] = field(default_factory=list)
    image_end: list[int] = field(default_factory=list)
    first_trained: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    """Position -> why the template refuses that conversation (its numbers are 0)."""

    def select(self, keep: list[int]) -> Lengths:
        """The lengths of the conversations at positions `keep`."""
        columns = (self.total, self.image_end, self.first_trained)
        return Lengths(*([column[i] for i in keep] for column in columns))


@dataclass
class Rendered:
    """A conversation as one string: the text the chat template renders (one `<image>` per image), the
    character spans that are trained (each answer with its EOS) and where each image placeholder starts."""

    text: str
    trained: list[tuple[int, int]]
    images: list[int] = field(default_factory=list)

    @property
    def image(self) -> int | None:
        """Where the first image placeholder starts (None without an image)."""
        return self.images[0] if self.images else None


def render(pieces: list[Piece], bos: str, eos: str) -> Rendered:
    """Join a template's pieces into one string; adjacent trained pieces make one span."""
    parts: list[str] = []
    trained: list[tuple[int, int]] = []
    images: list[int] = []
    pos = 0
    for piece in pieces:
        text = {"bos": bos, "eos": eos, "image": IMAGE_PLACEHOLDER}.get(piece.kind, piece.text)
        if piece.kind == "image":
            images.append(pos)
        if piece.trained and text:
            if trained and trained[-1][1] == pos:
                trained[-1] = (trained[-1][0], pos + len(text))
            else:
                trained.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)
    return Rendered("".join(parts), trained, images)


def user_pieces(text: str) -> list[Piece]:
    """A user turn's text as pieces: each `<image>` left in it (a sample with several images) an image piece."""
    out: list[Piece] = []
    for k, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            out.append(Piece("image"))
        if segment:
            out.append(Piece("text", segment))
    return out


def chat_messages(conv: Conversation, image=None) -> list[dict]:
    """The conversation as chat messages for `processor.apply_chat_template`: the system prompt (when the
    conversation overrides it) as a system message, the image first in the first user message (`image`,
    e.g. a PIL image, goes into that item, for `tokenize=True`). With several images (`image` then a list
    of them, one per placeholder), each user message's parts keep the text's order."""
    messages = []
    if conv.system is not None:
        messages.append({"role": "system", "content": conv.system})
    if conv.images_inline:
        queue = list(image) if image is not None else []
        for role, text in conv.turns:
            if role != "user" or IMAGE_PLACEHOLDER not in text:
                messages.append({"role": role, "content": text})
                continue
            parts = []
            for k, segment in enumerate(text.split(IMAGE_PLACEHOLDER + "\n")):
                if k:
                    parts.append({"type": "image", "image": queue.pop(0)} if queue else {"type": "image"})
                if segment:
                    parts.append({"type": "text", "text": segment})
            messages.append({"role": role, "content": parts})
        return messages
    for i, (role, text) in enumerate(conv.turns):
        if i == 0 and conv.has_image:
            item = {"type": "image"} if image is None else {"type": "image", "image": image}
            messages.append({"role": role, "content": [item, {"type": "text", "text": text}]})
        else:
            messages.append({"role": role, "content": text})
    return messages
