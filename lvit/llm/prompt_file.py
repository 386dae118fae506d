"""Prompt files: the YAML files that hold the texts lvit sends to an LLM (`lvit data generate`'s prompt sets,
the LLaVA-Bench judge, the ScienceQA arbiter). Each is shipped with lvit and replaceable by a user's own file;
`read_prompt_file` reads one and names the file, the missing key and the shipped example when it is wrong."""

from __future__ import annotations

from pathlib import Path

from lvit.errors import LvitError


def read_prompt_file(path: str | Path, texts: tuple[str, ...], shipped: Path, what: str) -> dict:
    """The mapping in the YAML file `path`, whose keys `texts` must each hold non-empty text."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LvitError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LvitError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw[k].strip() for k in texts):
        keys = ", ".join(f"`{k}:`" for k in texts)
        raise LvitError(f"{path}: needs {keys} (text); see {shipped}")
    return raw
