"""The conversation encoder: one tokenization of the rendered text, labels from character offsets, and the lengths
the data checks use."""

from __future__ import annotations

import dataclasses

from lvit.errors import LvitError
from lvit.templates.builtin import AUTO, TEMPLATES, Template
from lvit.templates.chat_template import LMChatTemplate
from lvit.templates.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, Conversation, Encoded, Lengths, Rendered

_CHUNK = 8192  # conversations per batched tokenizer call in `ConversationEncoder.lengths`


def get_template(name: str, tokenizer=None) -> Template:
    """The template called `name`; "auto" is the tokenizer's own chat template (it needs `tokenizer`)."""
    if name == AUTO:
        if tokenizer is None:
            raise ValueError("the 'auto' template is the tokenizer's chat template; pass the tokenizer")

        return LMChatTemplate(tokenizer)
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join([*TEMPLATES, AUTO])}") from None


class ConversationEncoder:
    """Turns conversations into (input_ids, labels) with a template and a tokenizer.

    `num_image_tokens` image-token ids stand for the image (what the vision tower yields after the
    CLS token is dropped), so the model's features and the ids always match; a conversation that carries its
    images' own counts (`Conversation.image_tokens`, LLaVA-NeXT's AnyRes) takes those instead.

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
        self.image_tokens_for_size = None
        """LLaVA-NeXT's AnyRes: (height, width) -> an image's tokens (`lvit.model.next.image_tokens`); None: every
        image takes `num_image_tokens`."""
        name = template if isinstance(template, str) else template.name
        if tokenizer.eos_token_id is None and name != AUTO:  # auto: the chat template's end-of-turn token
            raise ValueError("the tokenizer has no EOS token; lvit's templates end each answer with it")
        check_tokenizer(tokenizer, image_token_id)
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self._bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
        self._eos = tokenizer.eos_token or ""

    def sized(self, conv: Conversation, sizes: list[tuple[int, int]]) -> Conversation:
        """`conv` with each image's token count from its (height, width) as loaded, where counts depend on the size
        (`image_tokens_for_size`); `conv` itself otherwise."""
        if self.image_tokens_for_size is None or not sizes:
            return conv
        return dataclasses.replace(conv, image_tokens=tuple(self.image_tokens_for_size(h, w) for h, w in sizes))

    def like(self, template: Template | str) -> ConversationEncoder:
        """The same tokenizer and image-token counts with another template."""
        other = ConversationEncoder(template, self.tokenizer, self.image_token_id, self.num_image_tokens)
        other.image_tokens_for_size = self.image_tokens_for_size
        return other

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
        for conv, r, token_ids, offsets in zip(
            convs, rendered, batch["input_ids"], batch["offset_mapping"], strict=True
        ):
            input_ids: list[int] = []
            labels: list[int] = []
            image_end = 0
            image_starts = set(r.images)
            counts = iter(self._image_counts(conv, len(r.images)))
            spans = iter(r.trained)
            span = next(spans, None)
            for token, (a, b) in zip(token_ids, offsets, strict=True):
                while span is not None and a >= span[1]:
                    span = next(spans, None)
                if span is not None and (a < span[0] < b or a < span[1] < b):
                    raise ValueError(_straddle(self.tokenizer, token, r.text, a, b))
                if a in image_starts and token == self.image_token_id:
                    image_starts.discard(a)
                    n = next(counts)
                    input_ids += [token] * n
                    labels += [IGNORE_INDEX] * n
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
        out = Lengths()

        def finish(rendered: list[Rendered | None], encodings, first: int) -> None:
            for i, (r, e) in enumerate(zip(rendered, encodings, strict=True), first):
                if r is None:
                    total = image_end = first_trained = 0
                else:
                    try:
                        extra = [n - 1 for n in self._image_counts(convs[i], len(r.images))]
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

    def _image_counts(self, conv: Conversation, n_images: int) -> list[int]:
        """The image tokens of each of the conversation's `n_images` images: its own counts, or the fixed one."""
        counts = conv.image_tokens
        if counts is None and n_images and self.image_tokens_for_size is not None:
            raise RuntimeError(
                "lvit bug: an image's tokens depend on its size here, and the conversation has no counts"
            )
        if counts is None:
            return [self.num_image_tokens] * n_images
        if len(counts) != n_images:
            raise ValueError(f"lvit bug: {len(counts)} image-token counts for {n_images} image(s)")
        return list(counts)

    def _measure(self, r: Rendered, e, extra: list[int]) -> tuple[int, int, int]:
        """(total, image_end, first_trained) of one rendered conversation from its Rust encoding `e`, as
        `encode` counts them (image k expanded by `extra[k]` tokens); ValueError where `encode` refuses."""
        n = len(e)
        images = [e.char_to_token(position) for position in r.images]
        if None in images:  # `check_tokenizer` makes sure `<image>` is one token
            raise ValueError("lvit bug: no token at the image placeholder")
        n += sum(extra)
        first_trained = n
        for start, end in r.trained:
            index = _first_token_in(e, start, end)
            if index is None:
                continue
            a, b = e.token_to_chars(index)
            if a < start:
                raise ValueError(_straddle(self.tokenizer, e.ids[index], r.text, a, b))
            if first_trained == n:
                first_trained = index + sum(x for image, x in zip(images, extra, strict=True) if image < index)
        return n, (images[-1] + 1 + sum(extra) if images else 0), first_trained

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
            f"{image_token_id}: {IMAGE_PLACEHOLDER} must be an added special token "
            "(lvit.model.processor.load_tokenizer adds it)."
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
