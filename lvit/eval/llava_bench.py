"""`lvit eval llava-bench`: the LLaVA paper's judge protocol (Sec. 5.1), with any OpenAI-compatible endpoint.

For each question a text-only judge reads the image's context, the question, the reference answer and the
model's answer, and scores both from 1 to 10 (helpfulness, relevance, accuracy, level of detail) with a short
review. The score reported is the model's mean relative to the reference's, x100, per category and overall
(as LLaVA's `llava/eval/summarize_gpt_review.py` computes it: mean of the model's scores / mean of the
reference's scores x 100).

Files, in LLaVA-Bench's published layout (github.com/haotian-liu/LLaVA, `llava/eval/eval_gpt_review_bench.py`
and `eval_gpt_review_visual.py`; data at huggingface.co/datasets/liuhaotian/llava-bench-in-the-wild):

- questions (`questions.jsonl`, LLaVA-Bench COCO's `qa90_questions.jsonl`): `question_id`, `image`, `text`,
  `category` (`conv`, `detail`, `complex`);
- context (`context.jsonl`; COCO's `caps_boxes_coco2014_val_80.jsonl`), by `image`: `caption` (a description,
  text or a list: in the wild) or `captions` (a list) with `instances` (`category`, `bbox`: COCO);
- reference answers (`answers_gpt4.jsonl`; COCO's `qa90_gpt4_answer.jsonl`): `question_id`, `text`;
- the model's answers: an lvit answer file (`lvit generate`: `id`, `answer`) or LLaVA's (`question_id`, `text`),
  or generated here from the questions with MODEL.

The judge's scores are read from its reply's first line (two numbers from 1 to 10); a reply without them is
asked again once, then recorded as a failure (`failures.jsonl`), counted and left out of the means. Reviews
(`reviews.jsonl`) are appended as they come: a rerun asks only for the questions not reviewed yet.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lvit.errors import LvitError
from lvit.eval.predictions import (
    BenchmarkResult,
    answer_records,
    check_model_or_predictions,
    read_predictions,
    write_results,
)
from lvit.llm.context import probe
from lvit.llm.endpoint import ChatClient, Endpoint
from lvit.llm.job import run_requests, usage_summary
from lvit.llm.jsonl_log import read_rows
from lvit.llm.prompt_file import load_prompt
from lvit.textfiles import json_lines, read_text

log = logging.getLogger(__name__)

CATEGORIES = {"conv": "conversation", "detail": "detail", "complex": "complex"}
JUDGE_PROMPT = Path(__file__).resolve().parent / "prompts" / "llava_bench_judge.yaml"
_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s+(\d+(?:\.\d+)?)\s*$")


@dataclass
class BenchQuestion:
    id: str
    image: str
    text: str
    category: str
    context: str
    reference: str


@dataclass
class JudgePrompt:
    """The judge's texts: system message, scoring instruction, and the re-ask for a reply without scores."""

    system: str
    instruction: str
    reask: str


def load_judge_prompt(path: str | Path | None = None) -> JudgePrompt:
    return load_prompt(JudgePrompt, path, JUDGE_PROMPT, "judge prompt")


def _jsonl(path: str | Path, what: str) -> list[dict]:
    rows = []
    for n, row, why in json_lines(read_text(path, what)):
        if why is not None:
            raise LvitError(f"{path}:{n}: not valid JSON ({why}); is it LLaVA-Bench's {what}?")
        if not isinstance(row, dict):
            raise LvitError(f"{path}:{n}: expected a JSON object")
        rows.append(row)
    return rows


def context_text(row: dict) -> str:
    """The context the judge reads: captions (and COCO's boxes), or the written description."""
    caps = row.get("captions", row.get("caption"))
    caps = [caps] if isinstance(caps, str) else list(caps or [])
    text = "\n".join(str(c).strip() for c in caps)
    instances = row.get("instances") or []
    if instances:
        text += "\n\n" + "\n".join(f"{i['category']}: {i['bbox']}" for i in instances)
    return text


def read_bench(questions: str | Path, context: str | Path, references: str | Path) -> list[BenchQuestion]:
    """LLaVA-Bench's questions joined with their image's context and reference answer; errors name the row."""
    contexts = {}
    for n, row in enumerate(_jsonl(context, "context file"), start=1):
        if "image" not in row or not ("caption" in row or "captions" in row):
            raise LvitError(f"{context}: row {n} needs `image` and `caption` (or `captions`, with `instances`)")
        bad = [i for i in row.get("instances") or [] if not (isinstance(i, dict) and "category" in i and "bbox" in i)]
        if bad:
            raise LvitError(
                f"{context}: row {n}: every entry of `instances` needs `category` and `bbox`; found {bad[0]!r}"
            )
        contexts[row["image"]] = context_text(row)
    refs = {}
    for n, row in enumerate(_jsonl(references, "reference answers"), start=1):
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise LvitError(f"{references}: row {n} needs `question_id` and `text` (the reference answer)")
        refs[str(row["question_id"])] = row["text"]
    out = []
    for n, row in enumerate(_jsonl(questions, "questions"), start=1):
        missing = [k for k in ("question_id", "image", "text", "category") if k not in row]
        if missing:
            raise LvitError(f"{questions}: row {n} lacks {', '.join(missing)}")
        qid = str(row["question_id"])
        if row["image"] not in contexts:
            raise LvitError(f"{questions}: question {qid}'s image {row['image']!r} has no row in {context}")
        if qid not in refs:
            raise LvitError(f"{questions}: question {qid} has no reference answer in {references}")
        category = CATEGORIES.get(row["category"], str(row["category"]))
        out.append(BenchQuestion(qid, row["image"], row["text"], category, contexts[row["image"]], refs[qid]))
    if not out:
        raise LvitError(f"{questions}: no questions")
    return out


def judge_messages(prompt: JudgePrompt, q: BenchQuestion, answer: str) -> list[dict]:
    content = (
        f"Content of the image:\n{q.context}\n\nQuestion:\n{q.text}\n\n"
        f"First answer:\n{q.reference}\n(end of the first answer)\n\n"
        f"Second answer:\n{answer}\n(end of the second answer)\n\n{prompt.instruction}"
    )
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": content}]


def parse_scores(reply: str) -> tuple[float, float] | str:
    """The two scores that make up the reply's first non-empty line, or the reason they cannot be read.

    As LLaVA's `parse_score`: the line is the two numbers alone (separated by a space or a comma; markdown
    bold tolerated), so stray digits in a free-text line are not taken for scores."""
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    if not lines:
        return "empty reply"
    match = _SCORES.match(lines[0].replace("*", "").replace(",", " "))
    if match is None:
        return f"the first line is not two scores: {lines[0][:80]!r}"
    numbers = [float(match.group(1)), float(match.group(2))]
    if not all(1 <= x <= 10 for x in numbers):
        return f"a score outside 1..10: {lines[0][:80]!r}"
    return numbers[0], numbers[1]


def judge_one(client: ChatClient, prompt: JudgePrompt, q: BenchQuestion, answer: str) -> dict:
    """Ask the judge (and once more when the scores cannot be read): a review row, or a failure row."""
    messages = judge_messages(prompt, q, answer)
    replies = []
    for _ in range(2):
        reply = client.chat(messages).text
        replies.append(reply)
        scores = parse_scores(reply)
        if not isinstance(scores, str):
            return {"id": q.id, "question_id": q.id, "category": q.category, "scores": list(scores),
                    "review": reply.strip(), "asked": len(replies)}  # fmt: skip
        messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": prompt.reask}]
    return {"id": q.id, "question_id": q.id, "category": q.category, "failed": scores, "raw": replies}


def score(questions: list[BenchQuestion], reviews: dict[str, dict], failures: dict[str, dict]) -> dict:
    """Relative scores per category and overall; questions not reviewed are counted, not scored."""
    groups: dict[str, list[list[float]]] = {}
    for q in questions:
        if q.id in reviews:
            groups.setdefault(q.category, []).append(reviews[q.id]["scores"])
            groups.setdefault("all", []).append(reviews[q.id]["scores"])

    def bucket(pairs):
        if not pairs:
            return {"relative": None, "reference": None, "model": None, "n": 0}
        ref = sum(p[0] for p in pairs) / len(pairs)
        model = sum(p[1] for p in pairs) / len(pairs)
        return {"relative": 100 * model / ref, "reference": ref, "model": model, "n": len(pairs)}

    names = [c for c in CATEGORIES.values() if c in groups] + sorted(set(groups) - {*CATEGORIES.values(), "all"})
    return {
        "categories": {c: bucket(groups[c]) for c in names},
        **bucket(groups.get("all", [])),
        "questions": len(questions),
        "failed": sum(q.id in failures and q.id not in reviews for q in questions),
        "missing_answers": 0,
    }


def format_table(scores: dict) -> str:
    def row(name, b):
        if not b["n"]:
            return f"{name:<14}{'-':>10}{'-':>11}{'-':>8}{0:>6}"
        return f"{name:<14}{b['relative']:>10.1f}{b['reference']:>11.2f}{b['model']:>8.2f}{b['n']:>6}"

    lines = ["LLaVA-Bench (model relative to the reference, x100)", f"{'category':<14}{'relative':>10}"
             f"{'reference':>11}{'model':>8}{'n':>6}"]  # fmt: skip
    lines += [row(name, b) for name, b in scores["categories"].items()]
    lines.append(row("all", scores))
    lines.append(
        f"judge failures (left out): {scores['failed']}; questions without a model answer: {scores['missing_answers']}"
    )
    return "\n".join(lines)


def judge(
    questions: list[BenchQuestion],
    answers: dict[str, str],
    out_dir: str | Path,
    endpoint: Endpoint,
    prompt: JudgePrompt | None = None,
    concurrency: int = 4,
    retry_failures: bool = False,
    progress: bool | None = None,
) -> dict:
    """Review every question not reviewed yet into `out_dir/reviews.jsonl`; score all into `results.json`."""
    prompt = prompt or load_judge_prompt()
    out_dir = Path(out_dir)
    reviews_path, failures_path = out_dir / "reviews.jsonl", out_dir / "failures.jsonl"
    reviews, failures = read_rows(reviews_path), read_rows(failures_path)
    missing = [q.id for q in questions if q.id not in answers]
    skip = set(reviews) | (set() if retry_failures else set(failures))
    todo = [q for q in questions if q.id not in skip and q.id in answers]
    if len(todo) < len(questions) - len(missing):
        log.info("%s: %d question(s) reviewed before; asking for the rest", reviews_path, len(questions) - len(todo))
    client = ChatClient(endpoint)
    run_requests(
        todo, lambda q: judge_one(client, prompt, q, answers[q.id]), {reviews_path: reviews, failures_path: failures},
        record=lambda _q, row, write: write(failures_path if "failed" in row else reviews_path, row),
        refused=lambda q, error, write: write(failures_path, {"id": q.id, "question_id": q.id, "category": q.category,
                                                              "failed": f"endpoint_refused: {error}", "raw": []}),
        name=lambda q: f"question {q.id}",
        kept=lambda: f"{reviews_path} keeps {len(reviews)} reviews", rest="review the rest", desc="judging",
        concurrency=concurrency, progress=progress,
    )  # fmt: skip
    scores = score(questions, reviews, failures)
    scores["missing_answers"] = len(missing)
    scores["judge"] = usage_summary(client)

    write_results("llava-bench", scores, out_dir / "results.json", reviews=str(reviews_path))
    return scores


def bench_records(questions: list[BenchQuestion]) -> list[dict]:
    """The questions as LLaVA-format question records (image placeholder first), for `predictions.answer_records`."""
    return [
        {"id": q.id, "image": q.image, "conversations": [{"from": "human", "value": f"<image>\n{q.text}"}]}
        for q in questions
    ]


def run_eval(
    model,
    questions_path,
    context_path,
    references_path,
    endpoint: Endpoint,
    predictions=None,
    out=None,
    judge_prompt=None,
    concurrency: int = 4,
    retry_failures: bool = False,
    limit: int | None = None,
    **generation,
):
    """`lvit eval llava-bench`: answer with MODEL (or read --predictions), then judge and score."""
    check_model_or_predictions(model, predictions, out)
    probe(endpoint)  # nothing listening is said now, not after the answers are generated
    questions = read_bench(questions_path, context_path, references_path)
    if limit is not None:
        questions = questions[:limit]
    prompt = load_judge_prompt(judge_prompt)
    if predictions is not None:
        answers = read_predictions(predictions)
        folder = Path(out) if out is not None else Path(predictions).with_name(Path(predictions).stem + "_llava_bench")
    else:
        folder = Path(out) if out is not None else Path(model) / "eval" / "llava-bench"
        rows = answer_records(model, bench_records(questions), folder, **generation).rows
        answers = {qid: row["answer"] for qid, row in rows.items()}
    scores = judge(questions, answers, folder, endpoint, prompt, concurrency, retry_failures)
    return BenchmarkResult(scores, folder / "results.json")
