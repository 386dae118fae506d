"""An Ollama `Modelfile` for the GGUF pair, so `ollama create NAME -f OUT/Modelfile` takes the export folder as it is.

Ollama's templates are Go templates, not the Jinja chat template the export carries, so lvit derives one from the
export's own template: it renders a conversation of marked placeholder turns and cuts the text around them into
the pieces every turn is made of (what comes before the first user message, between a user message and its answer,
after an answer, and after the last user message: the generation prompt). `pieces` holds that cut and `render`
rebuilds a conversation from it, which the tests compare with the Jinja template's own text. The BOS token is left
out (llama.cpp adds it, as the GGUF's tokenizer says), and so is the image placeholder: Ollama puts the image into
the user message itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from lvit.errors import LvitError

_U1, _A1, _U2 = "\x00LVIT_U1\x00", "\x00LVIT_A1\x00", "\x00LVIT_U2\x00"


def pieces(processor) -> dict[str, str]:
    """`head`, `user_end` (user message -> answer), `answer_end` (answer -> next user message) and `prompt_end`
    (after the last user message) of the processor's chat template, without the BOS text."""
    two = [
        {"role": "user", "content": [{"type": "text", "text": _U1}]},
        {"role": "assistant", "content": [{"type": "text", "text": _A1}]},
        {"role": "user", "content": [{"type": "text", "text": _U2}]},
    ]
    text = processor.apply_chat_template(two, add_generation_prompt=True, tokenize=False)
    try:
        head, rest = text.split(_U1)
        user_end, rest = rest.split(_A1)
        answer_end, prompt_end = rest.split(_U2)
    except ValueError:
        raise LvitError("lvit export --gguf: the chat template does not place each message once.") from None
    bos = processor.tokenizer.bos_token
    if bos and head.startswith(bos):
        head = head[len(bos) :]
    return {"head": head, "user_end": user_end, "answer_end": answer_end, "prompt_end": prompt_end}


def render(parts: dict[str, str], turns: list[tuple[str, str]]) -> str:
    """The text `parts` give a conversation of alternating (role, text) turns ending with a user turn, as the
    Modelfile's template does."""
    out = parts["head"]
    for i, (role, text) in enumerate(turns):
        last = i == len(turns) - 1
        if role == "user":
            out += text + (parts["prompt_end"] if last else parts["user_end"])
        else:
            out += text + parts["answer_end"]
    return out


def _go(text: str) -> str:
    """`text` as literal Go-template output (braces are the only characters Go templates treat specially)."""
    return text.replace("{{", '{{ "{{" }}')


def template(parts: dict[str, str]) -> str:
    """The Go template of `parts`. No `{{-` / `-}}`: Go trims whitespace around those, and the pieces' own spaces
    (" [/INST]", " ASSISTANT:") must stay."""
    return (
        _go(parts["head"])
        + "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{ if eq $m.Role "user" }}{{ $m.Content }}{{ if $last }}'
        + _go(parts["prompt_end"])
        + "{{ else }}"
        + _go(parts["user_end"])
        + '{{ end }}{{ else if eq $m.Role "assistant" }}{{ $m.Content }}'
        + _go(parts["answer_end"])
        + "{{ end }}{{ end }}"
    )


def write_modelfile(folder: Path, model_file: str, mmproj_file: str, processor, stop: list[str], num_ctx: int) -> Path:
    """`folder/Modelfile` for `model_file` + `mmproj_file` (names in `folder`)."""
    parts = pieces(processor)
    lines = [
        "# Ollama: ollama create NAME -f Modelfile (in this folder); written by lvit export --gguf",
        f"FROM ./{model_file}",
        f"FROM ./{mmproj_file}",
        f'TEMPLATE """{template(parts)}"""',
        *(f"PARAMETER stop {json.dumps(s)}" for s in stop),
        f"PARAMETER num_ctx {num_ctx}",
    ]
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
