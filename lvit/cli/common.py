"""What several commands share: the help texts of a model argument, quieting library notices, writing results to
stdout."""

from __future__ import annotations

import sys

BASE_HELP = (
    "KEY=PATH, KEY vision_tower or language_model: where a run's base part is now, if it moved since training "
    "(stage-1, LoRA and QLoRA runs are rebuilt from it). The run's lvit_recipe.yaml holds the absolute paths it "
    "trained from. Repeatable."
)
MODEL_HELP = "An lvit run folder or checkpoint-N (any stage / method), or an exported / stock LLaVA folder."
FOUR_BIT_HELP = "Load the language model in 4-bit NF4 (full runs and exported folders; QLoRA runs are 4-bit already)."


def quiet_model_libraries() -> None:
    """The library notices a user cannot act on stay off the console (`lvit.console`), for commands that load models."""
    from lvit.console import quiet_libraries

    quiet_libraries()


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def unescape(text: str) -> str:
    """`--prompt-suffix '\\nAnswer ...'` as typed in a shell: a literal backslash-n is a newline."""
    return text.replace("\\n", "\n")
