"""The prompt sets of `lvit data generate`: one YAML file per kind, shipped in `lvit/data/prompts/`.

A file holds `system` (the system message), `examples` (few-shot pairs, `context` then `response`, sent as
earlier user and assistant turns: the in-context examples of the LLaVA paper, Sec. 3) and, for `detail`,
`questions` (the instructions a detailed description answers). A user replaces any of them with their own:
`--prompts DIR` (a folder holding some of `conversation.yaml`, `detail.yaml`, `complex.yaml`; the others stay
the shipped ones) or `--prompt KIND=FILE`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lvit.errors import LvitError
from lvit.llm.prompt_file import read_prompt_file

KINDS = ("conversation", "detail", "complex")
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "prompts"


@dataclass
class PromptSet:
    kind: str
    system: str
    examples: list[tuple[str, str]]
    questions: list[str]
    source: Path

    def messages(self, context: str) -> list[dict]:
        """The chat request's messages for one image's context."""
        out = [{"role": "system", "content": self.system}]
        for example_context, response in self.examples:
            out += [{"role": "user", "content": example_context}, {"role": "assistant", "content": response}]
        out.append({"role": "user", "content": context})
        return out

    def question_for(self, record_id: str) -> str:
        """The user instruction of a `detail` record: one of `questions`, the same for the same id on every run."""
        digest = int(hashlib.sha256(record_id.encode("utf-8")).hexdigest(), 16)
        return self.questions[digest % len(self.questions)]


def load_prompt_file(kind: str, path: str | Path) -> PromptSet:
    path = Path(path)
    raw = read_prompt_file(path, ("system",), SHIPPED_DIR / f"{kind}.yaml", f"prompt file for {kind!r}")
    examples = []
    for i, ex in enumerate(raw.get("examples") or []):
        if not (isinstance(ex, dict) and isinstance(ex.get("context"), str) and isinstance(ex.get("response"), str)):
            raise LvitError(f"{path}: examples[{i}] needs `context:` and `response:`, both text")
        examples.append((ex["context"].strip(), ex["response"].strip()))
    questions = raw.get("questions") or []
    if not all(isinstance(q, str) and q.strip() for q in questions):
        raise LvitError(f"{path}: `questions:` must be a list of non-empty strings")
    if kind == "detail" and not questions:
        raise LvitError(f"{path}: the detail prompt needs `questions:`, the instructions a description answers")
    return PromptSet(kind, raw["system"].strip(), examples, [q.strip() for q in questions], path)


def load_prompts(prompts_dir: str | Path | None = None, files: dict[str, str] | None = None) -> dict[str, PromptSet]:
    """The prompt set of every kind: `files[kind]`, else `prompts_dir/<kind>.yaml` if present, else the shipped one."""
    files = dict(files or {})
    unknown = sorted(set(files) - set(KINDS))
    if unknown:
        raise LvitError(f"--prompt {unknown[0]}=...: unknown kind; the kinds are {', '.join(KINDS)}")
    if prompts_dir is not None:
        prompts_dir = Path(prompts_dir)
        if not prompts_dir.is_dir():
            raise LvitError(f"--prompts {prompts_dir}: not a folder")
        found = [k for k in KINDS if (prompts_dir / f"{k}.yaml").is_file()]
        if not found:
            raise LvitError(f"--prompts {prompts_dir}: holds none of {', '.join(k + '.yaml' for k in KINDS)}")
        for k in found:
            files.setdefault(k, str(prompts_dir / f"{k}.yaml"))
    return {k: load_prompt_file(k, files.get(k, SHIPPED_DIR / f"{k}.yaml")) for k in KINDS}


def parse_prompt_options(values: list[str] | None) -> dict[str, str]:
    """`--prompt KIND=FILE` values as a dict."""
    out = {}
    for value in values or []:
        kind, sep, path = value.partition("=")
        if not sep or not path:
            raise LvitError(f"--prompt {value!r}: expected KIND=FILE, e.g. conversation=my_prompts/conversation.yaml")
        out[kind.strip()] = path
    return out
