"""`lvit chat MODEL --image PATH [--prompt TEXT]`: talk to a trained model, answers streamed.

The conversation keeps its history (the image in the first user turn) and is encoded with the
run's template exactly as in training (`ConversationEncoder(..., for_generation=True)`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from lvit.errors import LvitError
from lvit.generation import GenerationSettings, eval_mode, generate_batch
from lvit.runs.load import LoadedModel
from lvit.templates import Conversation

EXIT_WORDS = {"exit", "quit"}


def _streamer(tokenizer, write: Callable[[str], None]):
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        """transformers' TextStreamer, writing to `write` instead of printing."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            write(text + ("\n" if stream_end else ""))

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def check_image(image: str | Path) -> None:
    """`--image`: the file exists and decodes as an image; `lvit chat` checks it before the model loads."""
    from lvit.data.images import probe_image

    if not Path(image).is_file():
        raise LvitError(f"--image {image}: file not found")
    found = probe_image(str(image), None)
    if found is not None and found[1] == "error":
        raise LvitError(f"--image {image}: {found[2]}")


class ChatSession:
    """One conversation about (at most) one image."""

    def __init__(
        self, loaded: LoadedModel, image: str | Path | None = None, settings: GenerationSettings | None = None
    ):
        self.loaded = loaded
        self.settings = settings or GenerationSettings(max_new_tokens=512)
        self.encoder = loaded.encoder()
        self.turns: list[tuple[str, str]] = []
        self.pixel_values = None
        if image is not None:
            path = Path(image)
            if not path.is_file():
                raise LvitError(f"--image {image}: file not found")
            loader = loaded.image_loader()
            try:
                self.pixel_values = loader.pixel_values([loader.load(str(path))])
            except OSError as exc:
                raise LvitError(f"--image {image}: cannot be read as an image ({exc})") from None

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None

    def ask(self, text: str, write: Callable[[str], None] | None = None) -> str:
        """Answer `text` given the conversation so far; streams the answer to `write` as it is generated."""
        conv = Conversation(turns=[*self.turns, ("user", text)], has_image=self.has_image)
        streamer = _streamer(self.encoder.tokenizer, write) if write is not None else None
        with eval_mode(self.loaded.model) as model:
            (answer,) = generate_batch(
                model, self.encoder, None, [conv], [None], self.settings, streamer, self.pixel_values
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
