"""`lvit data generate`: the plan (which image gets which kind), the requests, and the files they fill.

Plan: record i is about image `i mod N` (N images, in input order) and its kind comes from a smooth weighted
round robin over the mix, so any prefix of the plan follows the mix as closely as whole records allow and a
larger `--records` only adds records. From the second pass over the images on, an image gets a kind it has not
had yet wherever the mix allows it (a kind whose share is not more than half a record ahead of the mix); where
it cannot (a kind's share is more than one record per image), the request says which variant it is, so no two
requests are the same and, even at temperature 0, no record copies another. A record's id is
`<image id>-<kind>`, plus `-<n>` for the image's n-th further record of that kind. The plan is the same on
every run of the same command. `--retry-rejects` asks again with a note naming why the last reply was
rejected, so a deterministic endpoint does not send the same reply back.

The endpoint is asked first what it serves (`lvit.llm.context`): nothing listening is an error before any work,
and where it tells its context length and counts tokens (vLLM), a prompt that cannot fit is rejected
(`prompt_too_long`) without being sent. A request the endpoint refuses (HTTP 400/413/422) rejects that record
(`endpoint_refused`, with the endpoint's message) and the job goes on (`lvit.llm.job`).

Files: the output (LLaVA JSON Lines, each row with `kind` and `source_id` besides LLaVA's keys, and `cleaned`, the
chat debris removed from the reply, when there was any: `lvit.data.generate.parse`) and the rejects file (`id`,
`source_id`, `kind`, `reason`, `message`, `raw`, `attempt`). A row is appended, flushed and fsynced only once
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
from lvit.data.generate.parse import Parsed, Rejected, parse_reply
from lvit.data.generate.prompts import KINDS, PromptSet
from lvit.errors import LvitError
from lvit.llm.context import PromptCounter, probe
from lvit.llm.endpoint import ChatClient, Endpoint, RequestRefused, Usage
from lvit.llm.job import run_requests
from lvit.llm.jsonl_log import read_rows

log = logging.getLogger(__name__)

# The LLaVA paper's mix (Sec. 3): 58K conversations, 23K detailed descriptions, 77K complex reasoning.
PAPER_MIX = {"conversation": 58.0, "detail": 23.0, "complex": 77.0}


# A later record's share may run this far ahead of the mix (in records' worth of credit) to give its image a
# kind the image has not had: the realised mix stays within three records of the asked one.
NEW_KIND_SLACK = 0.5
TOO_LONG_FIX = (
    "lower --max-tokens, serve the model with a longer context (vLLM: --max-model-len), or send fewer boxes "
    "(--max-boxes)"
)


@dataclass
class Task:
    id: str
    kind: str
    context: ImageContext
    variant: int = 0  # how many records of this kind its image had before this one
    retry: dict | None = None  # the earlier rejection, when `--retry-rejects` asks again

    def messages(self, prompts: dict[str, PromptSet], max_boxes: int | None = None) -> list[dict]:
        """The request: the kind's prompt over the image's context, plus a note on a repeat or a retry."""
        notes = []
        if self.variant:
            notes.append(
                f"This image already has {self.variant} earlier {self.kind} record(s). Write variant "
                f"{self.variant + 1}: a new one about other objects, details or aspects of the scene."
            )
        if self.retry:
            notes.append(
                f"An earlier reply for this image could not be used ({self.retry.get('reason')}; attempt "
                f"{self.retry.get('attempt', 1)}). Reply again, keeping exactly to the format asked for."
            )
        messages = prompts[self.kind].messages(self.context.text(max_boxes))
        if notes:
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + "\n\n" + " ".join(notes)}
        return messages


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
    had = [Counter() for _ in contexts]
    tasks = []
    for i in range(n):
        for k in KINDS:
            current[k] += mix.get(k, 0.0)
        seen = had[i % len(contexts)]
        allowed = [k for k in KINDS if mix.get(k, 0.0) > 0 and current[k] > -NEW_KIND_SLACK * total]
        kind = min(allowed, key=lambda k: (seen[k], -current[k], KINDS.index(k)))
        current[kind] -= total
        ctx = contexts[i % len(contexts)]
        variant = seen[kind]
        seen[kind] += 1
        tasks.append(Task(f"{ctx.id}-{kind}" + (f"-{variant}" if variant else ""), kind, ctx, variant))
    return tasks


def to_record(task: Task, parsed: Parsed, prompts: dict[str, PromptSet]) -> dict:
    """A LLaVA-format record (the image placeholder before the first question), with its kind and source id,
    and what was cleaned from the reply (`cleaned`) when anything was."""
    pairs = parsed.pairs
    if task.kind == "detail":
        pairs = [(prompts["detail"].question_for(task.id), pairs[0][1])]
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    row = {"id": task.id, "image": task.context.image, "conversations": turns, "kind": task.kind,
           "source_id": task.context.id}  # fmt: skip
    if parsed.cleaned:
        row["cleaned"] = list(parsed.cleaned)
    return row


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages)


@dataclass
class Summary:
    out: Path
    rejects: Path
    planned: int = 0
    skipped: int = 0
    written: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    in_file: Counter = field(default_factory=Counter)
    cleaned: Counter = field(default_factory=Counter)
    too_long: int = 0
    max_tokens: int | None = None
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
            "too_long_for_context": self.too_long,
            "cleaned": dict(self.cleaned),
            "records_in_file": dict(self.in_file),
            **self.usage.to_json(),
            "cost": self.cost,
        }

    def format_text(self) -> str:
        per_kind = ", ".join(f"{k} {self.written.get(k, 0)}" for k in KINDS)
        in_file = ", ".join(f"{k} {self.in_file.get(k, 0)}" for k in KINDS)
        reasons = ", ".join(f"{r} {n}" for r, n in self.rejected.most_common()) or "none"
        cleaned = ", ".join(f"{r} {n}" for r, n in self.cleaned.most_common()) or "nothing"
        lines = [
            f"written this run: {sum(self.written.values())} ({per_kind})",
            f"rejected this run: {sum(self.rejected.values())} ({reasons}) -> {self.rejects}",
            f"cleaned this run: {cleaned} (named in each record's `cleaned`)",
            f"done before (skipped): {self.skipped} of {self.planned} planned",
            f"records in {self.out}: {sum(self.in_file.values())} ({in_file})",
            f"requests: {self.usage.requests} ({self.usage.retries} retries); tokens: {self.usage.prompt_tokens} "
            f"prompt + {self.usage.completion_tokens} completion",
        ]
        if self.too_long:
            now = f" (now {self.max_tokens})" if self.max_tokens else ""
            fix = TOO_LONG_FIX.replace("--max-tokens", f"--max-tokens{now}")
            lines.insert(2, f"  of which {self.too_long} too long for the model's context: {fix}")
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
    max_boxes: int | None = None,
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
        echo(endpoint.dry_run_text(first.messages(prompts, max_boxes)))
        return Summary(out, rejects, planned=len(tasks))
    done = read_rows(out)
    rejected_before = read_rows(rejects)
    skip = set(done) | (set() if retry_rejects else set(rejected_before))
    todo = [t for t in tasks if t.id not in skip]
    for task in todo:
        task.retry = rejected_before.get(task.id)
    summary = Summary(out, rejects, planned=len(tasks), skipped=len(tasks) - len(todo), max_tokens=endpoint.max_tokens)
    summary.in_file.update(row.get("kind", "?") for row in done.values())
    if summary.skipped:
        log.info(
            "%s: %d of %d planned records already done (%d written, %d rejected earlier); generating the rest",
            out, summary.skipped, len(tasks), sum(t.id in done for t in tasks),
            summary.skipped - sum(t.id in done for t in tasks),
        )  # fmt: skip
    client = ChatClient(endpoint, summary.usage)
    counter = PromptCounter(endpoint, probe(endpoint)) if todo else None
    log.info("generating %d records with %s, %d request(s) at a time", len(todo), endpoint.describe(), concurrency)

    def ask(task: Task):
        messages = task.messages(prompts, max_boxes)
        counter.check(messages)
        return client.chat(messages), messages

    def reject(task: Task, reason: str, message: str, raw: str, write) -> None:
        attempt = (task.retry or {}).get("attempt", 1) + 1 if task.retry else 1
        row = {"id": task.id, "source_id": task.context.id, "kind": task.kind, "reason": reason,
               "message": message, "raw": raw, "attempt": attempt}  # fmt: skip
        write(rejects, row)
        summary.rejected[reason] += 1

    def record(task: Task, result, write) -> None:
        reply, messages = result
        try:
            parsed = parse_reply(task.kind, reply.text, reply.finish_reason, prompt=_prompt_text(messages))
        except Rejected as exc:
            reject(task, exc.reason, str(exc), reply.text, write)
        else:
            write(out, to_record(task, parsed, prompts))
            summary.written[task.kind] += 1
            summary.in_file[task.kind] += 1
            summary.cleaned.update(parsed.cleaned)

    def refused(task: Task, error: RequestRefused, write) -> None:
        summary.too_long += error.too_long
        fix = f"; {TOO_LONG_FIX}" if error.too_long else ""
        reject(task, "endpoint_refused" if error.sent else "prompt_too_long", f"{error}{fix}", "", write)

    run_requests(
        todo, ask, {out: done, rejects: rejected_before}, record=record, refused=refused, name=lambda t: t.id,
        too_long_fix=TOO_LONG_FIX,
        kept=lambda: _kept(summary),
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
