"""The model card's "Serve it" section: the commands that serve an export in vLLM, and, with `--gguf`, in llama.cpp
and Ollama, with what llama.cpp's check measured.

vLLM's requirements were read from its LLaVA loader (vLLM 0.34.0: `model_executor/models/llava.py`, the model
registry, `model_executor/layers/activation.py`) and are checked on an export by `tests/test_vllm_requirements.py`;
`scripts/vllm_compare.py` compares vLLM's greedy answers with transformers' on a GPU machine.
"""

from __future__ import annotations

import json

# vLLM's `get_act_fn` knows no "linear": LLaVA-1.0's one-matrix projector (`projector: linear`, whose second
# matrix is the identity) is served with the activation replaced by PyTorch's identity module.
VLLM_LINEAR_OVERRIDE = {"projector_hidden_act": "torch.nn.modules.linear.Identity"}


def vllm_command(path: str, projector: str, max_length: int) -> str:
    override = f" \\\n  --hf-overrides '{json.dumps(VLLM_LINEAR_OVERRIDE)}'" if projector == "linear" else ""
    context = max(2048, max_length)
    return (
        f"vllm serve {path} --dtype bfloat16 --max-model-len {context} --limit-mm-per-prompt '{{\"image\": 1}}'"
        + override
    )


def serving_lines(name: str, recipe, gguf: dict | None) -> list[str]:
    path = f"path/to/{name}"
    lines = [
        "",
        "## Serve it",
        "",
        "vLLM (an OpenAI-compatible server; the chat template in this folder is used):",
        "",
        "```bash",
        vllm_command(path, recipe.model.projector, recipe.data.max_length),
        "```",
    ]
    if gguf is None:
        return lines
    model, mmproj = gguf["files"][0], gguf["files"][1]
    lines += [
        "",
        f"llama.cpp and Ollama: `{model}` (the language model) and `{mmproj}` (the vision tower and projector)"
        + (
            ", and quantized language models: " + ", ".join(f"`{f}`" for f in gguf["files"][2:-1])
            if gguf["files"][2:-1]
            else ""
        )
        + ".",
        "",
        "```bash",
        f"llama-server -m {path}/{model} --mmproj {path}/{mmproj}",
        f'llama-mtmd-cli -m {path}/{model} --mmproj {path}/{mmproj} --image image.jpg -p "What is in the picture?" '
        "--temp 0",
        f'cd {path} && ollama create {name} -f Modelfile && ollama run {name} "What is in the picture? ./image.jpg"',
        "```",
    ]
    checks = gguf.get("checks")
    if checks:
        lines += [
            "",
            "llama.cpp (llama-cpp-python) answered the check prompts of the run's data greedily, against "
            "transformers on this folder:",
            "",
            "| file | prompt ids equal | answers equal | top-1 agreement | image rows within |",
            "|---|---|---|---|---|",
            *(
                f"| `{c['model']}` | {c['prompt_ids_equal']}/{c['prompts']} | {c['answers_equal']}/{c['prompts']} "
                f"| {c['top1_agreement']:.3f} | {100 * c['image_difference']:.2g}% |"
                for c in checks
            ),
        ]
    return lines
