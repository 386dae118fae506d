"""`lvit eval llava-bench` and the ScienceQA arbiter, against a scripted judge on 127.0.0.1."""

from __future__ import annotations

import json
import re

import pytest
from scripted_server import Fault, ScriptedServer
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.errors import LvitError
from lvit.eval.arbiter import arbitrate, load_arbiter_prompt
from lvit.eval.llava_bench import judge, load_judge_prompt, parse_scores, read_bench
from lvit.llm.endpoint import Endpoint


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def bench(tmp_path):
    """Six questions on two images in LLaVA-Bench's layout: COCO-style context (captions + instances) for one,
    in-the-wild (a written caption) for the other; the model's answers in an lvit answer file."""
    cats = ["conv", "detail", "complex", "conv", "detail", "complex"]
    questions = [
        {"question_id": i, "image": "a.jpg" if i < 3 else "b.jpg", "text": f"q{i}?", "category": cats[i]}
        for i in range(6)
    ]
    context = [
        {"image": "a.jpg", "captions": ["A dog runs.", "A brown dog."],
         "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}]},
        {"id": "b", "image": "b.jpg", "caption": "A bowl of ramen on a table."},
    ]  # fmt: skip
    refs = [{"question_id": i, "text": f"reference {i}", "answer_id": f"r{i}"} for i in range(6)]
    answers = [{"id": str(i), "answer": f"model answer {i}"} for i in range(6)]
    return {
        "questions": _write(tmp_path / "questions.jsonl", questions),
        "context": _write(tmp_path / "context.jsonl", context),
        "references": _write(tmp_path / "answers_gpt4.jsonl", refs),
        "predictions": _write(tmp_path / "model_answers.jsonl", answers),
        "tmp": tmp_path,
    }


# The judge's reply per question: q1's first reply cannot be read (four numbers) and is re-asked; q4's never can.
FIRST = {0: "8 6\nGood.", 1: "Assistant 1: 9, Assistant 2: 3", 2: "**7 7**\nBoth fine.", 3: "10 5\nok",
         4: "I liked both.", 5: "6 9\nThe second is better."}  # fmt: skip
SECOND = {1: "9 3\nThe first is right.", 4: "Still no scores here."}


def judge_responder(body, n):
    user = body["messages"][1]["content"]
    qid = int(re.search(r"Question:\nq(\d)\?", user).group(1))
    return SECOND[qid] if len(body["messages"]) > 2 else FIRST[qid]


def test_score_parsing():
    assert parse_scores("8 6\nreview") == (8.0, 6.0)
    assert parse_scores("\n 7.5, 9 \nx") == (7.5, 9.0)
    assert parse_scores("**7 7**") == (7.0, 7.0)
    assert "not two scores" in parse_scores("Assistant 1 8 9")
    assert "not two scores" in parse_scores("x 6 y 6 z")  # digits in free text are not scores
    assert "outside 1..10" in parse_scores("11 3")
    assert parse_scores("") == "empty reply"


def test_the_judge_reports_scores_relative_to_the_reference_and_resumes(bench):
    questions = read_bench(bench["questions"], bench["context"], bench["references"])
    assert questions[0].context == "A dog runs.\nA brown dog.\n\ndog: [0.1, 0.2, 0.5, 0.9]"
    assert questions[3].context == "A bowl of ramen on a table." and questions[0].category == "conversation"
    answers = {str(i): f"model answer {i}" for i in range(6)}
    out = bench["tmp"] / "judged"
    with ScriptedServer(judge_responder) as server:
        endpoint = Endpoint(server.base_url, "judge", retries=2, backoff=0.01)
        scores = judge(questions, answers, out, endpoint, concurrency=3, progress=False)
        assert len(server.requests) == 6 + 2  # q1 and q4 asked twice
        sent = server.requests[0].body["messages"][1]["content"]
        assert "First answer:\nreference" in sent and "Second answer:\nmodel answer" in sent
    # By hand: conversation q0 (8, 6), q3 (10, 5) -> 11/18; detail q1 (9, 3) (q4 failed) -> 3/9;
    # complex q2 (7, 7), q5 (6, 9) -> 16/13; all: model 30 / reference 40.
    cats = scores["categories"]
    assert cats["conversation"]["relative"] == pytest.approx(100 * 5.5 / 9)
    assert cats["detail"]["relative"] == pytest.approx(100 * 3 / 9) and cats["detail"]["n"] == 1
    assert cats["complex"]["relative"] == pytest.approx(100 * 8 / 6.5)
    assert scores["relative"] == pytest.approx(100 * 30 / 40) and scores["failed"] == 1
    failure = json.loads((out / "failures.jsonl").read_text())
    assert failure["question_id"] == "4" and failure["raw"] == ["I liked both.", "Still no scores here."]
    assert len((out / "reviews.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "results.json").read_text())["relative"] == pytest.approx(75.0)
    with ScriptedServer(judge_responder) as server:  # a rerun asks nothing; --retry-failures asks q4 again
        endpoint = Endpoint(server.base_url, "judge")
        assert judge(questions, answers, out, endpoint, progress=False)["relative"] == pytest.approx(75.0)
        assert server.requests == []
        judge(questions, answers, out, endpoint, retry_failures=True, progress=False)
        assert len(server.requests) == 2


@pytest.fixture
def short_backoff(monkeypatch):
    """The CLI's endpoint with a 10 ms first back-off instead of 1 s (the waits are asserted in test_endpoint.py)."""
    import functools

    from lvit.cli import llm_options

    monkeypatch.setattr(llm_options, "make_endpoint", functools.partial(llm_options.make_endpoint, backoff=0.01))


def test_cli_judges_an_answer_file_through_faults(bench, short_backoff):
    faults = {0: Fault("429", retry_after="0"), 2: Fault("500"), 4: Fault("drop")}

    def responder(body, n):
        return faults.get(n) or judge_responder(body, n)

    with ScriptedServer(responder) as server:
        args = ["eval", "llava-bench", "--questions", str(bench["questions"]), "--context", str(bench["context"])]
        args += ["--references", str(bench["references"]), "--predictions", str(bench["predictions"])]
        args += ["--base-url", server.base_url, "--model", "judge", "--out", str(bench["tmp"] / "cli")]
        result = CliRunner().invoke(app, args)
        assert len(server.requests) == 8 + 3
    assert result.exit_code == 0, result.output
    assert re.search(r"all\s+75\.0\s+8\.00\s+6\.00\s+5", result.output), result.output
    assert "judge failures (left out): 1" in result.output
    assert server.requests[1].body["temperature"] == 0.2


# --- the ScienceQA arbiter ------------------------------------------------------------------------------------------


def _problem(pid, answer, n=3, subject="natural science", image=None, grade="grade4"):
    return {"question": f"Which one, {pid}?", "choices": [f"c{i}" for i in range(n)], "answer": answer, "hint": "",
            "image": image, "subject": subject, "grade": grade, "lecture": "", "solution": ""}  # fmt: skip


PROBLEMS = {"p0": _problem("p0", 0), "p1": _problem("p1", 0, image="i.png"),
            "p2": _problem("p2", 1, subject="social science"), "p3": _problem("p3", 2, grade="grade9")}  # fmt: skip
MODEL = {"p0": "The answer is A.", "p1": "The answer is B.", "p2": "I do not know.", "p3": "The answer is C."}
LLM_OWN = {"p0": "The answer is A.", "p1": "The answer is A.", "p2": "The answer is B.", "p3": "The answer is A."}
DECIDE = {"p1": "The answer is A.", "p2": "Hmm, hard to say.", "p3": "The answer is C."}


def arbiter_responder(body, n):
    """The LLM's own answer or its decision, for the problem named in the question's first line."""
    user = body["messages"][-1]["content"]
    pid = user.split(",")[1].split("?")[0].strip()
    return DECIDE[pid] if "First assistant's answer" in user else LLM_OWN[pid]


def test_the_arbiter_decides_where_model_and_llm_disagree(tmp_path):
    pids = list(PROBLEMS)
    with ScriptedServer(arbiter_responder) as server:
        endpoint = Endpoint(server.base_url, "arbiter", backoff=0.01)
        result = arbitrate(PROBLEMS, pids, MODEL, tmp_path, endpoint, concurrency=2, progress=False)
        assert len(server.requests) == 4 + 3  # its own answers, then p1, p2, p3 (p0: both say A)
        decided = [r.body["messages"][-1]["content"] for r in server.requests[4:]]
        assert all("First assistant's answer" in d for d in decided)
    # model right: p0, p3; LLM right: p0, p1, p2; combined: p0, p1 (arbiter), p2 (arbiter unparsed -> model's
    # "I do not know": wrong), p3 (arbiter keeps C): 3 of 4.
    assert result["model"]["correct"] == 2 and result["text_llm"]["correct"] == 3 and result["combined"]["correct"] == 3
    assert result["disagreements"] == 3 and result["arbiter_unparsed_kept_model"] == 1
    assert (
        result["combined"]["categories"]["SOC"]["correct"] == 0
        and result["combined"]["categories"]["IMG"]["correct"] == 1
    )
    with ScriptedServer(arbiter_responder) as server:  # everything is on file: a rerun asks nothing
        again = arbitrate(PROBLEMS, pids, MODEL, tmp_path, Endpoint(server.base_url, "arbiter"), progress=False)
        assert server.requests == [] and again["combined"] == result["combined"]


def test_cli_scienceqa_with_an_arbiter_reports_three_columns(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(PROBLEMS)}))
    (tmp_path / "preds.json").write_text(json.dumps(MODEL))
    with ScriptedServer(arbiter_responder) as server:
        args = ["eval", "scienceqa", "--problems", str(tmp_path / "problems.json"), "--splits"]
        args += [str(tmp_path / "pid_splits.json"), "--predictions", str(tmp_path / "preds.json")]
        args += ["--arbiter-base-url", server.base_url, "--arbiter-model", "m"]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"all\s+50\.00\s+75\.00\s+75\.00", result.output), result.output
    saved = json.loads((tmp_path / "preds_results.json").read_text())
    assert (
        saved["arbiter"]["combined"]["correct"] == 3
        and (tmp_path / "preds_arbiter" / "arbiter_decisions.jsonl").is_file()
    )
    with ScriptedServer(arbiter_responder) as server:  # --out: a folder holding the results and the arbiter's files
        args[-3] = server.base_url
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "sqa")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "sqa" / "results.json").read_text())["arbiter"]["combined"]["correct"] == 3
    assert (tmp_path / "sqa" / "arbiter_decisions.jsonl").is_file() and (
        tmp_path / "sqa" / "arbiter_answers.jsonl"
    ).is_file()
    result = CliRunner().invoke(app, [*args[:-4], "--arbiter-model", "m"])
    assert result.exit_code == 2 and "--arbiter-base-url" in result.output


@pytest.mark.parametrize("load", [load_judge_prompt, load_arbiter_prompt])
def test_a_bad_prompt_file_is_refused_with_the_file_and_the_fix(tmp_path, load):
    broken = tmp_path / "broken.yaml"
    broken.write_text("system: [unclosed\n")
    with pytest.raises(LvitError, match=r"broken\.yaml: not valid YAML"):
        load(broken)
    partial = tmp_path / "partial.yaml"
    partial.write_text("system: Judge fairly.\n")
    with pytest.raises(LvitError, match=r"partial\.yaml: needs `system:`, .* \(text\); see .*\.yaml"):
        load(partial)
    with pytest.raises(LvitError, match="prompt not found"):
        load(tmp_path / "missing.yaml")
    assert load(None).system  # the shipped file reads


def test_a_context_box_without_its_category_is_refused_with_the_row(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "image": "a.jpg", "text": "What?", "category": "conv"}\n')
    (tmp_path / "r.jsonl").write_text('{"question_id": 1, "text": "A cat."}\n')
    (tmp_path / "c.jsonl").write_text(
        '{"image": "a.jpg", "captions": ["A cat."], "instances": [{"bbox": [0, 0, 1, 1]}]}\n'
    )
    with pytest.raises(LvitError, match=r"c\.jsonl: row 1: every entry of `instances` needs `category` and `bbox`"):
        read_bench(tmp_path / "q.jsonl", tmp_path / "c.jsonl", tmp_path / "r.jsonl")
