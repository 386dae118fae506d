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
import sys
from dataclasses import dataclass
from pathlib import Path

from lvit.console import stderr_is_tty
from lvit.data.scienceqa import build_prompt
from lvit.errors import Interrupted
from lvit.eval.scienceqa_score import FAILED, parse_answer, predicted_index, score
from lvit.llm.endpoint import ChatClient, Endpoint, EndpointError, Usage, run_concurrently
from lvit.llm.jsonl_log import append, open_append, read_rows
from lvit.llm.prompt_file import read_prompt_file

log = logging.getLogger(__name__)
ARBITER_PROMPT = Path(__file__).resolve().parent / "prompts" / "scienceqa_arbiter.yaml"


@dataclass
class ArbiterPrompt:
    system: str
    answer: str
    decide: str


def load_arbiter_prompt(path: str | Path | None = None) -> ArbiterPrompt:
    keys = ("system", "answer", "decide")
    raw = read_prompt_file(path if path is not None else ARBITER_PROMPT, keys, ARBITER_PROMPT, "arbiter prompt")
    return ArbiterPrompt(*(raw[k].strip() for k in keys))


def _ask_all(items: list, work, path: Path, what: str, concurrency: int, progress: bool) -> dict[str, dict]:
    """Rows by id: those already in `path`, plus one per item not there yet (`work(item)` -> row)."""
    from tqdm.auto import tqdm

    rows = read_rows(path)
    todo = [item for item in items if item[0] not in rows]
    bar = tqdm(total=len(todo), desc=what, unit="q", disable=not progress, file=sys.stderr)
    try:
        with open_append(path) as f:
            for _item, row, error in run_concurrently(todo, work, concurrency):
                if error is not None:
                    raise error
                append(f, row)
                rows[row["id"]] = row
                bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"{path} keeps {len(rows)} rows; run the same command again to continue") from None
    except EndpointError as exc:
        bar.close()
        raise EndpointError(f"{exc}\n{path} keeps {len(rows)} rows; rerun to continue", exc.status) from None
    bar.close()
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
    show = stderr_is_tty() if progress is None else progress
    usage = Usage()
    client = ChatClient(endpoint, usage)

    def question(pid: str) -> str:
        return build_prompt(problems[pid])

    def own_answer(item):
        pid = item[0]
        messages = [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": f"{question(pid)}\n\n{prompt.answer}"},
        ]
        return {"id": pid, "answer": client.chat(messages).text}

    llm = _ask_all(
        [(pid,) for pid in pids], own_answer, out_dir / "arbiter_answers.jsonl", "text LLM", concurrency, show
    )
    llm_outputs = {pid: llm[pid]["answer"] for pid in pids}

    def valid(pid: str, text: str | None) -> str:
        letter = parse_answer(text) if text is not None else FAILED
        return letter if predicted_index(letter, len(problems[pid]["choices"])) >= 0 else FAILED

    disputed = [pid for pid in pids if valid(pid, model_outputs.get(pid)) != valid(pid, llm_outputs[pid])]

    def decide(item):
        pid = item[0]
        content = (
            f"{question(pid)}\n\nFirst assistant's answer:\n{model_outputs.get(pid) or '(no answer)'}\n\n"
            f"Second assistant's answer:\n{llm_outputs[pid]}\n\n{prompt.decide}"
        )
        messages = [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]
        return {"id": pid, "decision": client.chat(messages).text}

    decisions = _ask_all(
        [(pid,) for pid in disputed], decide, out_dir / "arbiter_decisions.jsonl", "arbiter", concurrency, show
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
        "arbiter": {"model": endpoint.model, "base_url": endpoint.base_url, **usage.to_json()},
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
