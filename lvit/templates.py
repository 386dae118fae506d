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

`data.template: auto` is the language model's own chat template (`lvit.chat_template.LMChatTemplate`): it
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
_CHUNK = 8192  # conversations per batched tokenizer call in `ConversationEncoder.lengths`

# Source: LLaVA `llava/conversation.py`, `conv_vicuna_v1` (system prompt, roles USER/ASSISTANT,
# separators " " and "</s>"); the same text is quoted in the LLaVA paper's Table 2 set-up.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


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
"""`data.template: auto`: the language model's own chat template (`lvit.chat_template.LMChatTemplate`)."""


def get_template(name: str, tokenizer=None) -> Template:
    """The template called `name`; "auto" is the tokenizer's own chat template (it needs `tokenizer`)."""
    if name == AUTO:
        if tokenizer is None:
            raise ValueError("the 'auto' template is the tokenizer's chat template; pass the tokenizer")
        from lvit.chat_template import LMChatTemplate

        return LMChatTemplate(tokenizer)
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join([*TEMPLATES, AUTO])}") from None


class ConversationEncoder:
    """Turns conversations into (input_ids, labels) with a template and a tokenizer.

    `num_image_tokens` image-token ids stand for the image (what the vision tower yields after the
    CLS token is dropped), so the model's features and the ids always match.

    A conversation is rendered to one string (the template's pieces, with the tokenizer's BOS and EOS
    strings and one `<image>`), tokenized once as `processor.apply_chat_template(..., tokenize=True)`
    tokenizes it (no special tokens added: the text starts with BOS), and the one `<image>` token is
    expanded to `num_image_tokens` (what the processor's `<image>` x N gives, `<image>` being an added
    token). A token is trained when its characters lie in a trained span; a token that straddles a
    span's edge is refused (`ValueError`, like any conversation the template refuses).
    """

    def __init__(self, template: Template | str, tokenizer, image_token_id: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        name = template if isinstance(template, str) else template.name
        if tokenizer.eos_token_id is None and name != AUTO:  # auto: the chat template's end-of-turn token
            raise ValueError("the tokenizer has no EOS token; lvit's templates end each answer with it")
        check_tokenizer(tokenizer, image_token_id)
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self._bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
        self._eos = tokenizer.eos_token or ""

    def render(self, conv: Conversation, for_generation: bool = False) -> Rendered:
        """The conversation's text (what the chat template renders) with its trained spans (none in a
        generation prompt, whose earlier answers are history) and image."""
        rendered = self.template.render(conv, for_generation, self._bos, self._eos)
        if for_generation:
            rendered.trained = []
        return rendered

    def encode(self, conv: Conversation, for_generation: bool = False) -> Encoded:
        return self.encode_many([conv], for_generation)[0]

    def encode_many(self, convs: list[Conversation], for_generation: bool = False) -> list[Encoded]:
        """Encode several conversations with one batched tokenizer call."""
        rendered = [self.render(c, for_generation) for c in convs]
        if not rendered:
            return []
        batch = self.tokenizer(
            [r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        out = []
        for r, token_ids, offsets in zip(rendered, batch["input_ids"], batch["offset_mapping"], strict=True):
            input_ids: list[int] = []
            labels: list[int] = []
            image_end = 0
            image_starts = set(r.images)
            spans = iter(r.trained)
            span = next(spans, None)
            for token, (a, b) in zip(token_ids, offsets, strict=True):
                while span is not None and a >= span[1]:
                    span = next(spans, None)
                if span is not None and (a < span[0] < b or a < span[1] < b):
                    raise ValueError(_straddle(self.tokenizer, token, r.text, a, b))
                if a in image_starts and token == self.image_token_id:
                    image_starts.discard(a)
                    input_ids += [token] * self.num_image_tokens
                    labels += [IGNORE_INDEX] * self.num_image_tokens
                    image_end = len(input_ids)
                    continue
                input_ids.append(token)
                labels.append(token if span is not None and span[0] <= a < span[1] else IGNORE_INDEX)
            out.append(Encoded(input_ids, labels, image_end, r.text))
        return out

    def lengths(self, convs: list[Conversation]) -> Lengths:
        """What `encode` would give for each conversation, in numbers: its length in tokens, where its image
        ends and where training starts, without building the ids. A conversation the template refuses is
        listed in `rejected` with the reason, instead of raising.

        Fast enough for every record of a large dataset: the texts are tokenized by the Rust tokenizer
        (`encode_batch`, no Python id lists), a chunk at a time, and each chunk's texts are rendered while
        the previous chunk is being tokenized (the Rust tokenizer runs without the GIL); the boundaries are
        found with the encodings' `char_to_token`.
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        backend = _plain_backend(self.tokenizer)
        if backend is None:  # a tokenizer in a non-plain state: measure with `encode`, the same numbers
            return self._lengths_by_encoding(convs)
        extra = self.num_image_tokens - 1
        out = Lengths()

        def finish(rendered: list[Rendered | None], encodings, first: int) -> None:
            for i, (r, e) in enumerate(zip(rendered, encodings, strict=True), first):
                if r is None:
                    total = image_end = first_trained = 0
                else:
                    try:
                        total, image_end, first_trained = self._measure(r, e, extra)
                    except ValueError as exc:
                        out.rejected[i] = str(exc)
                        total = image_end = first_trained = 0
                out.total.append(total)
                out.image_end.append(image_end)
                out.first_trained.append(first_trained)

        pending: deque = deque()
        with ThreadPoolExecutor(max_workers=1) as pool:
            for start in range(0, len(convs), _CHUNK):
                rendered: list[Rendered | None] = []
                for i, conv in enumerate(convs[start : start + _CHUNK], start):
                    try:
                        rendered.append(self.render(conv))
                    except ValueError as exc:
                        out.rejected[i] = str(exc)
                        rendered.append(None)
                texts = ["" if r is None else r.text for r in rendered]
                pending.append((rendered, start, pool.submit(backend.encode_batch, texts, add_special_tokens=False)))
                if len(pending) > 1:
                    rendered, first, future = pending.popleft()
                    finish(rendered, future.result(), first)
            while pending:
                rendered, first, future = pending.popleft()
                finish(rendered, future.result(), first)
        return out

    def _measure(self, r: Rendered, e, extra: int) -> tuple[int, int, int]:
        """(total, image_end, first_trained) of one rendered conversation from its Rust encoding `e`, as
        `encode` counts them (the image expanded by `extra` tokens); ValueError where `encode` refuses."""
        n = len(e)
        images = [e.char_to_token(position) for position in r.images]
        if None in images:  # `check_tokenizer` makes sure `<image>` is one token
            raise ValueError("lvit bug: no token at the image placeholder")
        n += extra * len(images)
        first_trained = n
        for start, end in r.trained:
            index = _first_token_in(e, start, end)
            if index is None:
                continue
            a, b = e.token_to_chars(index)
            if a < start:
                raise ValueError(_straddle(self.tokenizer, e.ids[index], r.text, a, b))
            if first_trained == n:
                first_trained = index + extra * sum(image < index for image in images)
        return n, (images[-1] + 1 + extra * len(images) if images else 0), first_trained

    def _lengths_by_encoding(self, convs: list[Conversation]) -> Lengths:
        out = Lengths()
        for i, conv in enumerate(convs):
            try:
                enc = self.encode(conv)
            except ValueError as exc:
                out.rejected[i] = str(exc)
                out.total.append(0), out.image_end.append(0), out.first_trained.append(0)
                continue
            out.total.append(len(enc.input_ids))
            out.image_end.append(enc.image_end)
            out.first_trained.append(enc.first_trained)
        return out


def check_tokenizer(tokenizer, image_token_id: int) -> None:
    """Refuse a tokenizer with which training ids cannot be derived from the rendered text: a slow one (no
    character offsets), or one that does not read `<image>` as a token of its own."""
    from lvit.errors import LvitError

    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "is_fast", False):
        raise LvitError(
            f"tokenizer {name!r} is a slow (Python) tokenizer; lvit needs a fast one (a `tokenizer.json`, "
            "`AutoTokenizer.from_pretrained(..., use_fast=True)`): it labels tokens by their character offsets. "
            "Save the tokenizer as a fast one (`save_pretrained` after loading it with use_fast=True)."
        )
    got = tokenizer(IMAGE_PLACEHOLDER * 2, add_special_tokens=False)["input_ids"]
    if got != [image_token_id] * 2:
        raise LvitError(
            f"tokenizer {name!r} reads {IMAGE_PLACEHOLDER * 2!r} as ids {got}, not twice the image token id "
            f"{image_token_id}: {IMAGE_PLACEHOLDER} must be an added special token (lvit.model.load_tokenizer "
            "adds it)."
        )


def _plain_backend(tokenizer):
    """The Rust tokenizer when calling it directly gives what `tokenizer(...)` gives (no truncation or
    padding left set, special tokens split as the wrapper splits them), else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "encode_batch")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return backend
    return None


def _first_token_in(e, start: int, end: int) -> int | None:
    """Index of the first token of Rust encoding `e` that starts in [start, end) or covers `start`."""
    index = e.char_to_token(start)
    if index is None:  # `start` is in no token (e.g. whitespace a normalizer removed)
        return next((k for k, (a, _) in enumerate(e.offsets) if start <= a < end), None)
    while index > 0 and e.token_to_chars(index - 1)[0] >= start:  # a zero-width token just before
        index -= 1
    return index


def _straddle(tokenizer, token: int, text: str, a: int, b: int) -> str:
    return (
        f"the tokenizer makes one token {tokenizer.convert_ids_to_tokens(token)!r} of {text[a:b]!r}, across the "
        "edge of an answer (the trained text), so its label would be wrong in training; an answer must start "
        "and end at a token boundary in the whole conversation's text"
    )


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
