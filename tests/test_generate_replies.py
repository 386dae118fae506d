"""The data engine against what real chat models write: the team's reply corpus (`tests/fixtures/replies/`),
each reply with the verdict a careful curator gives it, and a whole `lvit data generate` run on chatty replies."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from scripted_server import ScriptedServer
from test_data_generate import _images, kind_of
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.data.check import check_data
from lvit.data.generate import load_prompts, parse_reply
from lvit.data.generate.corpus import grade, table
from lvit.data.generate.hygiene import CLEANED

CORPUS = yaml.safe_load((Path(__file__).parent / "fixtures" / "replies" / "corpus.yaml").read_text(encoding="utf-8"))
PROMPTS = load_prompts()


@pytest.mark.parametrize("entry", CORPUS, ids=[e["name"] for e in CORPUS])
def test_each_reply_of_the_corpus_gets_its_verdict(entry):
    graded = grade(entry, PROMPTS)
    assert graded.outcome == "right", graded.detail


def test_the_corpus_covers_every_cleaning_and_every_reason_and_its_table_sums_up():
    cleaned = Counter(name for e in CORPUS for name in e.get("cleaned") or [])
    assert set(cleaned) == set(CLEANED)
    reasons = {e["reason"] for e in CORPUS if e["verdict"] == "reject"}
    assert {"refusal", "mentions_source", "other_language", "formatting", "truncated", "text_outside_turns"} <= reasons
    text = table([grade(e, PROMPTS) for e in CORPUS])
    counts = Counter(e["verdict"] for e in CORPUS)
    for verdict in ("keep", "clean", "reject"):
        assert f"| {verdict} | {counts[verdict]} | {counts[verdict]} | 0 | 0 | 0 |" in text, text


def test_the_language_check_needs_the_prompt_and_follows_it():
    french = next(e for e in CORPUS if e.get("reason") == "other_language" and e["kind"] == "detail")
    assert parse_reply("detail", french["reply"]).pairs  # no prompt given: nothing to compare with
    own = "Décris l'image en français, en prose, sans listes : la scène, les objets et les personnes."
    assert parse_reply("detail", french["reply"], prompt=own).pairs  # a French prompt takes a French reply


def test_each_cleaning_is_named_once_however_often_it_applies():
    reply = "Sure! Here you go:\n```\n### Conversation\nQuestion: What is it?\nAnswer: Sure! A **red** bus.\n```"
    parsed = parse_reply("conversation", reply)
    assert parsed.pairs == [("What is it?", "A red bus.")]
    assert parsed.cleaned == ("fence", "preamble", "markdown")


def test_a_run_on_chatty_replies_writes_clean_records_named_as_cleaned(tmp_path):
    """Replies with openers, fences, reasoning blocks, bold and sign-offs, through the CLI: each record's
    `cleaned` names what was cut, the summary counts it, and the file holds no debris and checks."""
    chatty = {k: [e for e in CORPUS if e["kind"] == k and e["verdict"] == "clean"] for k in PROMPTS}
    data, folder = _images(tmp_path, 12)
    sent = Counter()

    def responder(body, n):
        kind = kind_of(body)
        entry = chatty[kind][sent[kind] % len(chatty[kind])]
        sent[kind] += 1
        return entry["reply"]

    out = tmp_path / "instruct.jsonl"
    with ScriptedServer(responder) as server:
        args = ["data", "generate", str(data), "--image-folder", str(folder), "--out", str(out)]
        result = CliRunner().invoke(app, [*args, "--base-url", server.base_url, "--model", "m", "--records", "24"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and all(row["cleaned"] for row in rows)
    total = Counter(name for row in rows for name in row["cleaned"])
    assert f"cleaned this run: {', '.join(f'{k} {n}' for k, n in total.most_common())}" in result.output
    for row in rows:  # each record is exactly the cleaned turns of the reply it came from, named as cleaned
        turns = [t["value"].removeprefix("<image>\n") for t in row["conversations"]]
        answers = turns[1::2]
        entry = next(e for e in chatty[row["kind"]] if [t["a"] for t in e["turns"]] == answers)
        if row["kind"] != "detail":
            assert turns[0::2] == [t["q"] for t in entry["turns"]]
        assert set(row["cleaned"]) == set(entry["cleaned"])
    assert check_data(out, image_folder=folder).ok
