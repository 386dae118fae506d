"""The LLM-driven commands against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1.

The server (transformers' `serving` extra) runs offline with a tiny random Llama saved here with a chat
template (docs/stack-notes.md#transformers-serve). Its replies are random text, so these tests check the
protocol end to end, resumption, and that lvit's checks turn the garbage into counted failures with reasons
instead of training data or scores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

from lvit.llm.endpoint import Endpoint

pytestmark = pytest.mark.slow  # a server start (~5 s) and some 30 generations

pytest.importorskip("fastapi", reason="transformers serve needs the serving extra: pip install 'transformers[serving]'")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _tiny_chat_model(folder):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lvit.demo.tiny import TINY_TEXT, build_tokenizer

    build_tokenizer(folder, ["Question: Answer: The answer is"], style="bytelevel")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    # lvit's prompts (system text, few-shot examples, boxes) run to ~1,500 tokens in this tiny byte-level vocabulary;
    # transformers serve (5.25 on) refuses a prompt plus max_tokens beyond the model's length with HTTP 400, as vLLM
    # does (docs/stack-notes.md#transformers-serve), so the served model takes 4,096 (rotary positions: no weights).
    text = {**TINY_TEXT, "max_position_embeddings": 4096}
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **text)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`transformers serve` with the tiny model on 127.0.0.1: yields an `Endpoint` to it; stopped afterwards."""
    model = _tiny_chat_model(tmp_path_factory.mktemp("served") / "tiny-chat")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Endpoint(base, str(model), timeout=60, retries=1, backoff=0.05, max_tokens=12, temperature=1.0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_generate_through_transformers_serve_rejects_the_garbage_and_resumes(served, tmp_path):
    from lvit.data.check import check_data
    from lvit.data.generate import PAPER_MIX, generate, load_prompts, plan, read_jsonl

    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
        rows.append(
            {"image": f"{i}.png", "captions": ["A dark square."], "boxes": [{"label": "square", "bbox": [0, 0, 1, 1]}]}
        )
    # one image whose captions alone overflow the model's 4,096 positions: the server refuses that request (400)
    Image.new("RGB", (16, 16)).save(folder / "long.png")
    rows.append({"image": "long.png", "id": "long", "captions": ["A very long caption about a dark square. " * 300]})
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = plan(read_jsonl(data, folder), PAPER_MIX, 6)
    out = tmp_path / "instruct.jsonl"
    summary = generate(tasks, out, served, load_prompts(), concurrency=2, progress=False)
    rejects = [json.loads(line) for line in out.with_name("instruct.rejects.jsonl").read_text().splitlines()]
    written = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    assert sorted(r["id"] for r in rejects + written) == sorted(t.id for t in tasks)
    assert rejects, "a random model's replies should not pass the checks"
    (long,) = [row for row in rejects if row["source_id"] == "long"]
    assert long["reason"] == "endpoint_refused" and "the endpoint answered 400" in long["message"]
    assert "lower --max-tokens" in long["message"] and summary.too_long == 1  # transformers serve's wording is read
    for row in rejects:
        assert row["reason"] in {"truncated", "empty", "unreadable", "no_turns", "text_outside_turns", "too_short",
                                 "not_alternating", "empty_turn", "wrong_count", "leftover_prompt", "refusal",
                                 "mentions_source", "other_language", "endpoint_refused"}  # fmt: skip
        assert row["message"] and "raw" in row
    assert summary.usage.requests == 5 and summary.usage.completion_tokens > 0 and summary.usage.prompt_tokens > 0
    if written:
        assert check_data(out, image_folder=folder).ok
    again = generate(tasks, out, served, load_prompts(), progress=False)  # everything is on file
    assert again.usage.requests == 0 and again.skipped == 6


def test_llava_bench_judge_through_transformers_serve_counts_unreadable_scores(served, tmp_path):
    from lvit.eval.llava_bench import BenchQuestion, judge

    questions = [BenchQuestion(str(i), "a.jpg", f"q{i}?", "detail", "A dog.", "A dog on grass.") for i in range(3)]
    answers = {str(i): "A dog." for i in range(3)}
    scores = judge(questions, answers, tmp_path, served, concurrency=2, progress=False)
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    reviews = (tmp_path / "reviews.jsonl").read_text().splitlines()
    assert len(failures) + len(reviews) == 3
    assert all(len(f["raw"]) == 2 and f["failed"] for f in failures)  # asked twice, then a failure with the reason
    assert scores["failed"] == len(failures) and scores["judge"]["requests"] == 2 * len(failures) + len(reviews)
    again = judge(questions, answers, tmp_path, served, progress=False)
    assert again["judge"]["requests"] == 0


def test_scienceqa_arbiter_through_transformers_serve_keeps_the_models_answer(served, tmp_path):
    from lvit.eval.arbiter import arbitrate

    problems = {
        f"p{i}": {"question": f"Which one, {i}?", "choices": ["yes", "no"], "answer": i % 2, "hint": "", "image": None,
                  "subject": "natural science", "grade": "grade3", "lecture": "", "solution": ""}
        for i in range(3)
    }  # fmt: skip
    outputs = {"p0": "The answer is A.", "p1": "The answer is A.", "p2": "The answer is A."}
    result = arbitrate(problems, list(problems), outputs, tmp_path, served, concurrency=2, progress=False)
    assert result["model"]["correct"] == 2
    # The random LLM's replies name no option ("The answer is X." is several tokens a random 12-token reply does
    # not hit): every question is disputed, every decision is unreadable, and the model's answer stands.
    assert result["text_llm"]["failed"] == 3 and result["disagreements"] == 3
    assert result["arbiter_unparsed_kept_model"] == 3 and result["combined"]["correct"] == 2
    assert result["arbiter"]["requests"] == 6
    again = arbitrate(problems, list(problems), outputs, tmp_path, served, progress=False)
    assert again["arbiter"]["requests"] == 0 and again["combined"] == result["combined"]
