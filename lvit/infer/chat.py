"""`lvit chat MODEL [--image PATH ...] [--prompt TEXT]`: talk to a trained model, answers streamed.

The conversation keeps its history (the images in the first user turn) and is encoded with the
run's template exactly as in training (`ConversationEncoder(..., for_generation=True)`). One image is
encoded as a one-image record; several (`--image` given more than once) as a record with several images
whose `<image>` placeholders open the first user turn, in the order given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from lvit.data.images import probe_image
from lvit.data.normalise import inline_placeholders
from lvit.errors import LvitError
from lvit.infer.generation import GenerationSettings, eval_mode, generate_batch
from lvit.infer.load import LoadedModel
from lvit.templates.conversation import IMAGE_PLACEHOLDER, Conversation

EXIT_WORDS = {"exit", "quit"}


def _streamer(tokenizer, write: Callable[[str], None]):
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        """transformers' TextStreamer, writing to `write` instead of printing."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            write(text + ("\n" if stream_end else ""))

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _as_list(images) -> list[str | Path]:
    return [] if images is None else [images] if isinstance(images, (str, Path)) else list(images)


def _which(image: str | Path, k: int, n: int) -> str:
    """How an error names an `--image`: its path, and its place among several."""
    return f"--image {image}" + (f" (image {k + 1} of {n})" if n > 1 else "")


def check_image(images: str | Path | list[str | Path]) -> None:
    """`--image`: each file exists and decodes as an image; `lvit chat` checks them before the model loads."""
    paths = _as_list(images)
    for k, image in enumerate(paths):
        if not Path(image).is_file():
            raise LvitError(f"{_which(image, k, len(paths))}: file not found")
        found = probe_image(str(image), None)
        if found is not None and found[1] == "error":
            raise LvitError(f"{_which(image, k, len(paths))}: {found[2]}")


def check_placeholders(texts: list[str], n_images: int) -> int:
    """How many `<image>` placeholders the user turns `texts` hold: none (the images then open the first turn), or
    one per image, each standing where its image goes; any other count is an `LvitError` before the model runs."""
    found = sum(text.count(IMAGE_PLACEHOLDER) for text in texts)
    if found and found != n_images:
        raise LvitError(
            f"the prompt holds {found} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s): write one per "
            f"--image, in their order, or none (the images then open the first turn)"
        )
    return found


class ChatSession:
    """One conversation about no image, one image or several (all in the first user turn, in order)."""

    def __init__(
        self,
        loaded: LoadedModel,
        image: str | Path | list[str | Path] | None = None,
        settings: GenerationSettings | None = None,
    ):
        self.loaded = loaded
        self.settings = settings or GenerationSettings(max_new_tokens=512)
        self.encoder = loaded.encoder()
        self.turns: list[tuple[str, str]] = []
        self.image_inputs = None
        self.image_sizes: list[tuple[int, int]] = []
        self.images = _as_list(image)
        if self.images:
            loader = loaded.image_loader()
            loaded_images = []
            for k, path in enumerate(self.images):
                which = _which(path, k, len(self.images))
                if not Path(path).is_file():
                    raise LvitError(f"{which}: file not found")
                try:
                    loaded_images.append(loader.load(str(path)))
                except OSError as exc:
                    raise LvitError(f"{which}: cannot be read as an image ({exc})") from None
            self.image_inputs = loader.image_inputs(loaded_images)  # one image per row, in the order given
            self.image_sizes = [(i.height, i.width) for i in loaded_images]

    @property
    def has_image(self) -> bool:
        return self.image_inputs is not None

    def conversation(self, text: str) -> Conversation:
        """The conversation so far with `text` as the next user turn, as the model is asked it.

        With several images the first user turn opens with one `<image>` placeholder per image, as a record
        with several images whose placeholders start its first turn (`lvit.data.normalise.inline_placeholders`)."""
        turns = [*self.turns, ("user", text)]
        placed = check_placeholders([t for role, t in turns if role == "user"], len(self.images))
        if placed and len(self.images) == 1:  # one image: where the template puts it, as training did
            turns = [(role, inline_placeholders(t).replace(IMAGE_PLACEHOLDER + "\n", "").strip()) for role, t in turns]
        elif placed:  # several images, each where its placeholder stands
            turns = [(role, inline_placeholders(t) if role == "user" else t) for role, t in turns]
        elif len(self.images) > 1:
            role, first = turns[0]
            turns[0] = (role, f"{IMAGE_PLACEHOLDER}\n" * len(self.images) + first)
        return self.encoder.sized(Conversation(turns=turns, has_image=self.has_image), self.image_sizes)

    def ask(self, text: str, write: Callable[[str], None] | None = None) -> str:
        """Answer `text` given the conversation so far; streams the answer to `write` as it is generated."""
        conv = self.conversation(text)
        streamer = _streamer(self.encoder.tokenizer, write) if write is not None else None
        with eval_mode(self.loaded.model) as model:
            (answer,) = generate_batch(
                model, self.encoder, None, [conv], [None], self.settings, streamer, self.image_inputs
            )
        self.turns += [("user", text), ("assistant", answer)]
        return answer


def interactive(session: ChatSession, stdin: TextIO, write: Callable[[str], None]) -> int:
    """Read questions line by line until EOF or "exit"; returns the number of answers given."""
    answered = 0
    while True:
        write("USER: ")
        line = stdin.readline()
        if not line:  # EOF
            write("\n")
            return answered
        text = line.strip()
        if text.lower() in EXIT_WORDS:
            return answered
        if not text:
            continue
        write("ASSISTANT: ")
        session.ask(text, write)
        answered += 1
