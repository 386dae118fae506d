"""Prompt files: the YAML files that hold the texts lvit sends to an LLM (`lvit data generate`'s prompt sets,
the LLaVA-Bench judge, the ScienceQA arbiter). Each is shipped with lvit and replaceable by a user's own file;
`read_prompt_file` reads one and names the file, the missing key and the shipped example when it is wrong;
`load_prompt` reads one into a dataclass of texts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

from lvit.errors import LvitError
from lvit.textfiles import read_text

T = TypeVar("T")


def read_prompt_file(path: str | Path, texts: tuple[str, ...], shipped: Path, what: str) -> dict:
    """The mapping in the YAML file `path`, whose keys `texts` must each hold non-empty text."""
    import yaml

    text = read_text(path, what)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LvitError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw[k].strip() for k in texts):
        keys = ", ".join(f"`{k}:`" for k in texts)
        raise LvitError(f"{path}: needs {keys} (text); see {shipped}")
    return raw


def load_prompt(cls: type[T], path: str | Path | None, shipped: Path, what: str) -> T:
    """`cls` (a dataclass whose fields are all texts) from the prompt file `path`, or `shipped` when `path` is
    None: each field holds the text of the key of its name, stripped."""
    keys = tuple(field.name for field in dataclasses.fields(cls))
    raw = read_prompt_file(path if path is not None else shipped, keys, shipped, what)
    return cls(*(raw[k].strip() for k in keys))
