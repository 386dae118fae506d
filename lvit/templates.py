"""Conversation templates: how a conversation becomes token ids and loss labels.

Masks are exact by construction. A template turns a conversation into a list of pieces (text,
the image, BOS, EOS), each either trained or not; every text piece is tokenized on its own and
the ids are concatenated, so each token's label is known from the piece it came from. Nothing is
recovered afterwards by re-tokenizing prefixes (the source of LLaVA's "tokenization mismatch"
warnings), and the end-of-turn token is the tokenizer's EOS id, not a string that may split.

`ConversationEncoder.lengths` counts the tokens `encode` would produce without building the ids
(the same pieces, each distinct text tokenized once by the fast tokenizer): `lvit data check` and
training's up-front checks measure every sample with it.

lvit's own prompt building (demo accuracy, generation) uses the same pieces, so a model sees at
inference exactly the ids it was trained on. `VICUNA_V1_CHAT_TEMPLATE` renders the same text for
users of plain `transformers`.
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
    """Whether the sample's image goes at the start of the first user turn."""
    system: str | None = None
    """Overrides the template's system prompt when set."""


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
    pieces: list[Piece] = field(default_factory=list, repr=False)

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


class Template:
    """Base class: subclasses say which pieces a conversation is made of."""

    name: str

    def pieces(self, conv: Conversation, for_generation: bool = False) -> list[Piece]:
        raise NotImplementedError


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
                if i == 0 and conv.has_image:
                    out += [Piece("text", lead), Piece("image"), Piece("text", f"\n{text} ASSISTANT:")]
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
        out = [Piece("bos")]
        if conv.has_image:
            out.append(Piece("image"))
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


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None


class ConversationEncoder:
    """Turns conversations into (input_ids, labels) with a template and a tokenizer.

    `num_image_tokens` image-token ids stand for the image (what the vision tower yields after the
    CLS token is dropped), so the model's features and the ids always match.
    """

    def __init__(self, template: Template | str, tokenizer, image_token_id: int, num_image_tokens: int):
        self.template = get_template(template) if isinstance(template, str) else template
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; lvit's templates end each answer with it")

    def encode(self, conv: Conversation, for_generation: bool = False) -> Encoded:
        return self.encode_many([conv], for_generation)[0]

    def encode_many(self, convs: list[Conversation], for_generation: bool = False) -> list[Encoded]:
        """Encode several conversations with one batched tokenizer call."""
        all_pieces = [self.template.pieces(c, for_generation) for c in convs]
        texts = [p.text for pieces in all_pieces for p in pieces if p.kind == "text"]
        ids_iter = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out = []
        for pieces in all_pieces:
            input_ids: list[int] = []
            labels: list[int] = []
            image_end = 0
            for piece in pieces:
                if piece.kind == "text":
                    ids = list(next(ids_iter))
                elif piece.kind == "image":
                    ids = [self.image_token_id] * self.num_image_tokens
                elif piece.kind == "bos":
                    bos = self.tokenizer.bos_token_id
                    ids = [] if bos is None else [bos]
                else:
                    ids = [self.tokenizer.eos_token_id]
                input_ids += ids
                labels += ids if piece.trained else [IGNORE_INDEX] * len(ids)
                if piece.kind == "image":
                    image_end = len(input_ids)
            out.append(Encoded(input_ids, labels, image_end, pieces))
        return out

    def lengths(self, convs: list[Conversation]) -> Lengths:
        """What `encode` would give for each conversation, in numbers: its length in tokens, where its image
        ends and where training starts, without building the ids. A conversation the template refuses is
        listed in `rejected` with the reason, instead of raising.

        Fast enough for every record of a large dataset: each distinct text piece is tokenized once, with
        the fast tokenizer (`token_counts`), a chunk at a time, and the pieces of one chunk are built while
        the previous chunk is being tokenized (the Rust tokenizer runs without the GIL).
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        tokenizer = self.tokenizer
        bos = 0 if tokenizer.bos_token_id is None else 1
        n_image = self.num_image_tokens
        template = self.template
        out = Lengths()

        def finish(all_pieces, count) -> None:
            for pieces in all_pieces:
                pos, image_end, first = 0, 0, None
                for p in pieces:
                    kind = p.kind
                    n = count[p.text] if kind == "text" else n_image if kind == "image" else bos if kind == "bos" else 1
                    if first is None and p.trained and n:
                        first = pos
                    pos += n
                    if kind == "image":
                        image_end = pos
                out.total.append(pos)
                out.image_end.append(image_end)
                out.first_trained.append(pos if first is None else first)

        pending: deque = deque()
        with ThreadPoolExecutor(max_workers=1) as pool:
            for start in range(0, len(convs), _CHUNK):
                all_pieces = []
                for i, conv in enumerate(convs[start : start + _CHUNK], start):
                    try:
                        all_pieces.append(template.pieces(conv))
                    except ValueError as exc:
                        out.rejected[i] = str(exc)
                        all_pieces.append([])
                unique = list(dict.fromkeys(p.text for pieces in all_pieces for p in pieces if p.kind == "text"))
                pending.append((all_pieces, unique, pool.submit(token_counts, tokenizer, unique)))
                if len(pending) > 1:
                    pieces, texts, future = pending.popleft()
                    finish(pieces, dict(zip(texts, future.result(), strict=True)))
            while pending:
                pieces, texts, future = pending.popleft()
                finish(pieces, dict(zip(texts, future.result(), strict=True)))
        return out


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Token count of each text (no special tokens), as `tokenizer(texts)` would give, batched.

    Uses the Rust tokenizer's `encode_batch_fast` (no offsets, no Python id lists) when the
    tokenizer is a fast one in its plain state; otherwise the tokenizer itself.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# A Jinja chat template that renders the vicuna_v1 text, for `processor.apply_chat_template` in
# plain transformers. Images in a user message are placed first, followed by "\n".
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set system = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'][0]['text'] -%}{%- endif -%}"
    "{%- set messages = messages[1:] -%}{%- endif -%}"
    "{{- bos_token + system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- (' ' if loop.first else '') + 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
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
