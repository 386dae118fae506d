"""The ScienceQA arbiter: a text-only LLM makes the final call where it and the multimodal model disagree.

LLaVA paper (Liu et al., 2023, "Visual Instruction Tuning"), Sec. 5.2: the text-only LLM answers every
question itself; where its answer and LLaVA's differ, it is asked again with the question and both answers
and gives the final answer (the paper's best ScienceQA result, 92.53%, from 90.92% for LLaVA alone and
82.69% for text-only GPT-4). Where the arbiter's final reply names no valid option, the model's answer
stands (counted).

The LLM's answers and its decisions are appended to `arbiter_answers.jsonl` and `arbiter_decisions.jsonl`
as they come, so a rerun asks only what is missing. Answers are read with LLaVA's ScienceQA rules
(`lvit.eval.scienceqa_score.parse_answer`); scores are per the paper's categories (`lvit.eval.scienceqa.score`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lvit.data.scienceqa import build_prompt
from lvit.eval.scienceqa_score import FAILED, parse_answer, predicted_index, score
from lvit.llm.endpoint import ChatClient, Endpoint
from lvit.llm.job import run_requests, usage_summary
from lvit.llm.jsonl_log import read_rows
from lvit.llm.prompt_file import load_prompt

log = logging.getLogger(__name__)
ARBITER_PROMPT = Path(__file__).resolve().parent / "prompts" / "scienceqa_arbiter.yaml"


@dataclass
class ArbiterPrompt:
    """The arbiter's texts: its system message, the request for its own answer to a question, and the request
    to decide between two answers (`prompts/scienceqa_arbiter.yaml`)."""

    system: str
    answer: str
    decide: str


def load_arbiter_prompt(path: str | Path | None = None) -> ArbiterPrompt:
    return load_prompt(ArbiterPrompt, path, ARBITER_PROMPT, "arbiter prompt")


def _ask_all(
    pids: list[str], ask, path: Path, what: str, concurrency: int, progress: bool | None, key: str
) -> dict[str, dict]:
    """Rows by id: those already in `path`, plus one per pid not there yet (`ask(pid)` -> row). A request the
    endpoint refuses gives an empty `key` with the refusal beside it: no answer, so the model's stands."""
    rows = read_rows(path)
    todo = [pid for pid in pids if pid not in rows]
    run_requests(
        todo, ask, {path: rows}, kept=lambda: f"{path} keeps {len(rows)} rows", desc=what,
        concurrency=concurrency, progress=progress, name=lambda pid: f"problem {pid}",
        refused=lambda pid, error, write: write(path, {"id": pid, key: "", "refused": str(error)}),
    )  # fmt: skip
    return rows


def arbitrate(
    problems: dict,
    pids: list[str],
    model_outputs: dict[str, str],
    out_dir: str | Path,
    endpoint: Endpoint,
    prompt: ArbiterPrompt | None = None,
    concurrency: int = 4,
    progress: bool | None = None,
) -> dict:
    """Scores of the model alone, the text LLM alone and the two combined, by the paper's categories."""

    prompt = prompt or load_arbiter_prompt()
    out_dir = Path(out_dir)
    client = ChatClient(endpoint)

    def question(pid: str) -> str:
        return build_prompt(problems[pid])

    def own_answer(pid: str) -> dict:
        messages = [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": f"{question(pid)}\n\n{prompt.answer}"},
        ]
        return {"id": pid, "answer": client.chat(messages).text}

    llm = _ask_all(pids, own_answer, out_dir / "arbiter_answers.jsonl", "text LLM", concurrency, progress, "answer")
    llm_outputs = {pid: llm[pid]["answer"] for pid in pids}

    def valid(pid: str, text: str | None) -> str:
        letter = parse_answer(text) if text is not None else FAILED
        return letter if predicted_index(letter, len(problems[pid]["choices"])) >= 0 else FAILED

    disputed = [pid for pid in pids if valid(pid, model_outputs.get(pid)) != valid(pid, llm_outputs[pid])]

    def decide(pid: str) -> dict:
        content = (
            f"{question(pid)}\n\nFirst assistant's answer:\n{model_outputs.get(pid) or '(no answer)'}\n\n"
            f"Second assistant's answer:\n{llm_outputs[pid]}\n\n{prompt.decide}"
        )
        messages = [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]
        return {"id": pid, "decision": client.chat(messages).text}

    decisions = _ask_all(
        disputed, decide, out_dir / "arbiter_decisions.jsonl", "arbiter", concurrency, progress, "decision"
    )
    combined, fallback = {}, 0
    for pid in pids:
        if pid not in decisions:
            combined[pid] = model_outputs.get(pid, "")
            continue
        letter = valid(pid, decisions[pid]["decision"])
        if letter == FAILED:
            fallback += 1
            combined[pid] = model_outputs.get(pid, "")
        else:
            combined[pid] = f"The answer is {letter}."
    drop = lambda s: {k: v for k, v in s.items() if k != "results"}  # noqa: E731
    return {
        "model": drop(score(problems, pids, model_outputs)),
        "text_llm": drop(score(problems, pids, llm_outputs)),
        "combined": drop(score(problems, pids, combined)),
        "disagreements": len(disputed),
        "arbiter_unparsed_kept_model": fallback,
        "arbiter": usage_summary(client),
        "files": {
            "answers": str(out_dir / "arbiter_answers.jsonl"),
            "decisions": str(out_dir / "arbiter_decisions.jsonl"),
        },
    }


def format_table(result: dict) -> str:
    """Accuracy (%) by category: the model alone, the text LLM alone, and the combination."""
    columns = (("model", "model"), ("text LLM", "text_llm"), ("combined", "combined"))

    def pct(bucket):
        return "-" if bucket["accuracy"] is None else f"{100 * bucket['accuracy']:.2f}"

    lines = ["ScienceQA with the arbiter (accuracy %)", f"{'category':<10}" + "".join(f"{c:>11}" for c, _ in columns)]
    for cat in result["model"]["categories"]:
        lines.append(f"{cat:<10}" + "".join(f"{pct(result[k]['categories'][cat]):>11}" for _, k in columns))
    lines.append(f"{'all':<10}" + "".join(f"{pct(result[k]):>11}" for _, k in columns))
    lines.append(
        f"disagreements sent to the arbiter: {result['disagreements']}; arbiter replies without an option "
        f"(model's answer kept): {result['arbiter_unparsed_kept_model']}"
    )
    return "\n".join(lines)
