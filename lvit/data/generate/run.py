"""`lvit data generate`: the plan (which image gets which kind), the requests, and the files they fill.

Plan: record i is about image `i mod N` (N images, in input order) and its kind comes from a smooth weighted
round robin over the mix, so any prefix of the plan follows the mix as closely as whole records allow and a
larger `--records` only adds records. A record's id is `<image id>-<kind>`, plus `-<round>` from the second
pass over the images on; the plan is the same on every run of the same command.

Files: the output (LLaVA JSON Lines, each row with `kind` and `source_id` besides LLaVA's keys) and the rejects
file (`id`, `source_id`, `kind`, `reason`, `message`, `raw`). A row is appended, flushed and fsynced only once
its reply is complete and parsed, so a crash loses at most the requests in flight; a cut-off last line (a
crash mid-write) is removed on the next run. A rerun skips the ids already in either file (rejected ones are
asked again with `retry_rejects`), so nothing is written twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lvit.data.generate.contexts import ImageContext
from lvit.data.generate.parse import Rejected, parse_reply
from lvit.data.generate.prompts import KINDS, PromptSet
from lvit.errors import LvitError
from lvit.llm.endpoint import ChatClient, Endpoint, Usage
from lvit.llm.job import run_requests
from lvit.llm.jsonl_log import read_rows

log = logging.getLogger(__name__)

# The LLaVA paper's mix (Sec. 3): 58K conversations, 23K detailed descriptions, 77K complex reasoning.
PAPER_MIX = {"conversation": 58.0, "detail": 23.0, "complex": 77.0}


@dataclass
class Task:
    id: str
    kind: str
    context: ImageContext


def parse_mix(text: str | None) -> dict[str, float]:
    """`conversation=58,detail=23,complex=77` (weights, any scale; a kind left out gets 0) -> weights."""
    if not text:
        return dict(PAPER_MIX)
    mix = dict.fromkeys(KINDS, 0.0)
    for part in text.split(","):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or kind not in KINDS or weight < 0:
            raise LvitError(
                f"--mix {text!r}: expected KIND=WEIGHT pairs, e.g. conversation=58,detail=23,complex=77 "
                f"(kinds: {', '.join(KINDS)}; weights 0 or more)"
            )
        mix[kind] = weight
    if sum(mix.values()) <= 0:
        raise LvitError(f"--mix {text!r}: every weight is 0; give at least one kind a weight")
    return mix


def plan(contexts: list[ImageContext], mix: dict[str, float], records: int | None = None) -> list[Task]:
    """The records to generate, in order (see the module's docstring)."""
    n = len(contexts) if records is None else records
    if n < 1:
        raise LvitError(f"--records must be at least 1, got {n}")
    total = sum(mix.values())
    current = dict.fromkeys(KINDS, 0.0)
    tasks = []
    for i in range(n):
        for k in KINDS:
            current[k] += mix.get(k, 0.0)
        kind = max(KINDS, key=lambda k: (current[k], -KINDS.index(k)))
        current[kind] -= total
        ctx = contexts[i % len(contexts)]
        rnd = i // len(contexts)
        tasks.append(Task(f"{ctx.id}-{kind}" + (f"-{rnd}" if rnd else ""), kind, ctx))
    return tasks


def to_record(task: Task, pairs: list[tuple[str, str]], prompts: dict[str, PromptSet]) -> dict:
    """A LLaVA-format record (the image placeholder before the first question), with its kind and source id."""
    if task.kind == "detail":
        pairs = [(prompts["detail"].question_for(task.id), pairs[0][1])]
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return {"id": task.id, "image": task.context.image, "conversations": turns, "kind": task.kind,
            "source_id": task.context.id}  # fmt: skip


@dataclass
class Summary:
    out: Path
    rejects: Path
    planned: int = 0
    skipped: int = 0
    written: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    in_file: Counter = field(default_factory=Counter)
    usage: Usage = field(default_factory=Usage)
    cost: float | None = None

    def to_json(self) -> dict:
        return {
            "out": str(self.out),
            "rejects": str(self.rejects),
            "planned": self.planned,
            "skipped_done_before": self.skipped,
            "written": dict(self.written),
            "rejected": dict(self.rejected),
            "records_in_file": dict(self.in_file),
            **self.usage.to_json(),
            "cost": self.cost,
        }

    def format_text(self) -> str:
        per_kind = ", ".join(f"{k} {self.written.get(k, 0)}" for k in KINDS)
        in_file = ", ".join(f"{k} {self.in_file.get(k, 0)}" for k in KINDS)
        reasons = ", ".join(f"{r} {n}" for r, n in self.rejected.most_common()) or "none"
        lines = [
            f"written this run: {sum(self.written.values())} ({per_kind})",
            f"rejected this run: {sum(self.rejected.values())} ({reasons}) -> {self.rejects}",
            f"done before (skipped): {self.skipped} of {self.planned} planned",
            f"records in {self.out}: {sum(self.in_file.values())} ({in_file})",
            f"requests: {self.usage.requests} ({self.usage.retries} retries); tokens: {self.usage.prompt_tokens} "
            f"prompt + {self.usage.completion_tokens} completion",
        ]
        if self.cost is not None:
            lines.append(f"cost: {self.cost:.6g} (at the prices given per 1M tokens)")
        return "\n".join(lines)


def generate(
    tasks: list[Task],
    out: str | Path,
    endpoint: Endpoint,
    prompts: dict[str, PromptSet],
    concurrency: int = 4,
    rejects: str | Path | None = None,
    retry_rejects: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
    price_input: float | None = None,
    price_output: float | None = None,
    echo=print,
) -> Summary:
    """Ask the endpoint for every task not done yet; write records and rejects as they complete."""
    out = Path(out)
    rejects = Path(rejects) if rejects is not None else out.with_name(out.stem + ".rejects.jsonl")
    if out.resolve() == rejects.resolve():
        raise LvitError(f"--rejects {rejects} is the output file; give the rejects their own file")
    if dry_run:
        first = tasks[0]
        echo(f"dry run: {len(tasks)} records planned; the first request ({first.id}, {first.kind}), not sent:")
        echo(endpoint.dry_run_text(prompts[first.kind].messages(first.context.text())))
        return Summary(out, rejects, planned=len(tasks))
    done = read_rows(out)
    rejected_before = read_rows(rejects)
    skip = set(done) | (set() if retry_rejects else set(rejected_before))
    todo = [t for t in tasks if t.id not in skip]
    summary = Summary(out, rejects, planned=len(tasks), skipped=len(tasks) - len(todo))
    summary.in_file.update(row.get("kind", "?") for row in done.values())
    if summary.skipped:
        log.info(
            "%s: %d of %d planned records already done (%d written, %d rejected earlier); generating the rest",
            out, summary.skipped, len(tasks), sum(t.id in done for t in tasks),
            summary.skipped - sum(t.id in done for t in tasks),
        )  # fmt: skip
    client = ChatClient(endpoint, summary.usage)
    log.info("generating %d records with %s, %d request(s) at a time", len(todo), endpoint.describe(), concurrency)

    def ask(task: Task):
        return client.chat(prompts[task.kind].messages(task.context.text()))

    def record(task: Task, reply, write) -> None:
        try:
            pairs = parse_reply(task.kind, reply.text, reply.finish_reason)
        except Rejected as exc:
            row = {"id": task.id, "source_id": task.context.id, "kind": task.kind, "reason": exc.reason,
                   "message": str(exc), "raw": reply.text}  # fmt: skip
            write(rejects, row)
            summary.rejected[exc.reason] += 1
        else:
            write(out, to_record(task, pairs, prompts))
            summary.written[task.kind] += 1
            summary.in_file[task.kind] += 1

    run_requests(
        todo, ask, {out: done, rejects: rejected_before}, record=record, kept=lambda: _kept(summary),
        desc="generating", unit="rec", concurrency=concurrency, progress=progress,
        postfix=lambda: {"rejected": sum(summary.rejected.values())},
        rest="generate the rest", after_error="the same command continues from there",
    )  # fmt: skip
    summary.cost = summary.usage.cost(price_input, price_output)
    return summary


def _kept(summary: Summary) -> str:
    return (
        f"{summary.out} keeps {sum(summary.in_file.values())} records ({sum(summary.written.values())} from this "
        f"run), {sum(summary.rejected.values())} rejected this run in {summary.rejects}"
    )
