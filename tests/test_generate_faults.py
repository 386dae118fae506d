"""`lvit data generate` where real endpoints and real COCO files differ from the happy path: a request refused
(HTTP 400) rejects its record, not the job; refusals as the rule stop it with the cause; a prompt counted too
long is not sent; nothing listening is said at once; crowd boxes, split mismatches and images without captions;
no request sent twice; options checked before any input is read."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from PIL import Image
from scripted_server import Fault, ScriptedServer
from test_data_generate import GOOD, PROMPTS, _endpoint, _ids, _images, kind_of
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.data.generate import generate, plan, read_coco, read_jsonl
from lvit.data.generate.contexts import Box, ImageContext
from lvit.errors import LvitError
from lvit.llm.endpoint import EndpointError

VLLM_TOO_LONG = (
    "This model's maximum context length is 2048 tokens. However, you requested 2213 tokens (1189 in the messages, "
    "1024 in the completion). Please reduce the length of the messages or completion."
)


def _cli(server, data, folder, out, *extra):
    args = ["data", "generate", str(data), "--image-folder", str(folder), "--out", str(out)]
    return CliRunner().invoke(app, [*args, "--base-url", server.base_url, "--model", "m", *extra])


def test_one_request_in_20_refused_rejects_that_record_and_the_job_finishes(tmp_path):
    data, folder = _images(tmp_path, 20)
    out = tmp_path / "instruct.jsonl"

    def responder(body, n):
        return (
            Fault("400", text=VLLM_TOO_LONG) if "number 7." in body["messages"][-1]["content"] else GOOD[kind_of(body)]
        )

    with ScriptedServer(responder) as server:
        result = _cli(server, data, folder, out, "--concurrency", "3")
    assert result.exit_code == 0, result.output
    assert len(_ids(out)) == 19 and "img7.png" not in {i.split("-")[0] for i in _ids(out)}
    (reject,) = [json.loads(line) for line in out.with_name("instruct.rejects.jsonl").read_text().splitlines()]
    assert reject["id"].startswith("img7.png-") and reject["reason"] == "endpoint_refused"
    assert "the endpoint answered 400: This model's maximum context length is 2048" in reject["message"]
    assert "lower --max-tokens" in reject["message"] and "--max-boxes" in reject["message"]
    assert "rejected this run: 1 (endpoint_refused 1)" in result.output
    assert "of which 1 too long for the model's context: lower --max-tokens (now 1024)" in result.output
    with ScriptedServer(lambda body, n: GOOD[kind_of(body)]) as server:  # the same command: nothing left to do
        assert _cli(server, data, folder, out).exit_code == 0 and server.requests == []


def test_refusals_as_the_rule_stop_the_job_with_the_cause_and_keep_nothing_for_them(tmp_path):
    data, folder = _images(tmp_path, 10)
    out = tmp_path / "instruct.jsonl"
    refusal = Fault("400", text="temperature: unsupported value 0.0 for this model")
    with ScriptedServer(lambda body, n: refusal) as server:
        result = _cli(server, data, folder, out, "--concurrency", "1", "--temperature", "0")
        assert len(server.requests) == 8
    assert result.exit_code == 2
    assert "refused each of the first 8 requests, so the fault is not one record's" in result.output
    assert "unsupported value 0.0" in result.output and "--temperature" in result.output
    assert "Nothing was written for these 8" in result.output and "Traceback" not in result.output
    assert _ids(out) == [] and not out.with_name("instruct.rejects.jsonl").read_text().strip()
    with ScriptedServer(lambda body, n: GOOD[kind_of(body)]) as server:  # fixed: the same command does them all
        assert _cli(server, data, folder, out).exit_code == 0 and len(_ids(out)) == 10


def test_a_prompt_counted_too_long_is_rejected_without_being_sent(tmp_path):
    """vLLM tells its context length (/v1/models) and counts tokens (/tokenize): lvit does not pay for what
    cannot fit. A server that does not count is simply sent everything."""
    data, folder = _images(tmp_path, 4)
    out = tmp_path / "instruct.jsonl"

    def count(body):
        return 1900 if "number 2." in body["messages"][-1]["content"] else 800

    with ScriptedServer(lambda body, n: GOOD[kind_of(body)], max_model_len=2048, tokenize=count) as server:
        result = _cli(server, data, folder, out, "--max-tokens", "512")
        sent = server.user_texts()
    assert result.exit_code == 0, result.output
    assert len(sent) == 3 and not any("number 2." in text for text in sent)
    (reject,) = [json.loads(line) for line in out.with_name("instruct.rejects.jsonl").read_text().splitlines()]
    assert reject["id"].startswith("img2.png-") and reject["reason"] == "prompt_too_long"
    assert (
        "not sent: the prompt is 1900 tokens plus --max-tokens 512, more than the model's context of 2048"
        in (reject["message"])
    )
    assert "rejected this run: 1 (prompt_too_long 1)" in result.output and "requests: 3 " in result.output
    assert "lower --max-tokens (now 512)" in result.output
    with ScriptedServer(lambda body, n: GOOD[kind_of(body)], max_model_len=2048) as server:  # no /tokenize
        result = _cli(server, data, folder, out, "--max-tokens", "512", "--retry-rejects")
        assert result.exit_code == 0 and len(server.requests) == 1 and len(_ids(out)) == 4


def test_nothing_listening_is_said_at_once(tmp_path):
    data, folder = _images(tmp_path, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["data", "generate", str(data), "--image-folder", str(folder), "--out", str(tmp_path / "o.jsonl")]
    result = CliRunner().invoke(app, [*args, "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m"])
    assert result.exit_code == 2
    assert f"Nothing accepts connections at 127.0.0.1:{port}: start the server, or check --base-url" in result.output
    assert "--retries" not in result.output and not (tmp_path / "o.jsonl").exists()


def test_options_are_checked_before_any_input_is_read(tmp_path):
    base = ["data", "generate", str(tmp_path / "missing.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "o.jsonl"), "--concurrency", "0"])
    assert result.exit_code == 2 and "--concurrency must be at least 1, got 0" in result.output
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path)])
    assert result.exit_code == 2 and f"--out {tmp_path} is a folder; give the JSON Lines file" in result.output
    assert "Traceback" not in result.output


def test_retry_rejects_asks_differently_each_time(tmp_path):
    """At temperature 0 the same request gets the same reply: a retried record says why the last was rejected
    and which attempt this is, so the request (and the reply) changes."""
    data, folder = _images(tmp_path, 3)
    out = tmp_path / "instruct.jsonl"
    args = ["--mix", "conversation=1", "--temperature", "0"]
    with ScriptedServer(lambda body, n: "Nothing useful here.") as server:
        assert _cli(server, data, folder, out, *args).exit_code == 0
        assert _cli(server, data, folder, out, *args, "--retry-rejects").exit_code == 0
        texts = server.user_texts()
    assert len(texts) == 6 and len(set(texts)) == 6
    assert all("could not be used (no_turns; attempt 1)" in t for t in texts[3:])

    def answer_when_asked_again(body, n):
        return GOOD["conversation"] if "attempt 2" in body["messages"][-1]["content"] else "Still nothing."

    with ScriptedServer(answer_when_asked_again) as server:
        result = _cli(server, data, folder, out, *args, "--retry-rejects")
    assert "written this run: 3 (conversation 3" in result.output and len(_ids(out)) == 3


def _coco(tmp_path, images, captions, instances, categories=None):
    caps = {"images": images, "annotations": captions}
    inst = {"annotations": instances, "categories": categories or [{"id": 1, "name": "person"}]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    return tmp_path / "captions.json", tmp_path / "instances.json"


def _img(i):
    return {"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100}


def test_crowd_boxes_are_sent_as_groups(tmp_path):
    people = [{"id": k, "image_id": 1, "bbox": [10 * k, 10, 8, 30], "category_id": 1, "iscrowd": 0} for k in range(5)]
    crowd = {"id": 9, "image_id": 1, "bbox": [0, 50, 100, 50], "category_id": 1, "iscrowd": 1}
    caps, inst = _coco(tmp_path, [_img(1)], [{"image_id": 1, "caption": "Children in a park."}], [*people, crowd])
    (ctx,) = read_coco(caps, inst)
    labels = [b.label for b in ctx.boxes]
    assert labels == ["person"] * 5 + ["person (a group)"]
    assert "person (a group): [0.000, 0.500, 1.000, 1.000]" in ctx.text()


def test_instances_of_another_split_are_an_error_and_many_images_without_boxes_a_warning(tmp_path, caplog):
    captions = [{"image_id": i, "caption": f"Picture {i}."} for i in (1, 2, 3)]
    elsewhere = [{"id": 1, "image_id": 77, "bbox": [0, 0, 5, 5], "category_id": 1}]
    caps, inst = _coco(tmp_path, [_img(1), _img(2), _img(3), _img(4)], captions, elsewhere)
    with pytest.raises(LvitError, match=r"none of its 1 annotations is of an image captioned in .* same split"):
        read_coco(caps, inst)
    args = ["data", "generate", "--coco-captions", str(caps), "--coco-instances", str(inst), "--out"]
    result = CliRunner().invoke(
        app, [*args, str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    )
    assert result.exit_code == 2 and "are the two files from the same split" in result.output  # before any request
    one = [{"id": 1, "image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 1}]
    caps, inst = _coco(tmp_path, [_img(1), _img(2), _img(3), _img(4)], captions, one)
    with caplog.at_level(logging.INFO, logger="lvit"):
        contexts = read_coco(caps, inst)
    assert [c.id for c in contexts] == ["1", "2", "3"]
    assert "1 of 4 images have no caption and are left out" in caplog.text
    assert "2 of 3 captioned images have no box in" in caplog.text and "same split" in caplog.text


def test_max_boxes_keeps_the_largest_in_their_order():
    ctx = ImageContext("x", "x.png", ["A desk."], [Box("pen", (0, 0, 0.1, 0.1)), Box("desk", (0, 0, 1, 1)),
                                                   Box("cup", (0.5, 0.5, 0.8, 0.8))])  # fmt: skip
    text = ctx.text(max_boxes=2)
    assert "desk:" in text and "cup:" in text and "pen:" not in text and text.index("desk") < text.index("cup")
    assert "Objects" not in ctx.text(max_boxes=0) and ctx.text() == ctx.text(max_boxes=3)


def test_the_judge_records_a_refused_question_as_a_failure_and_goes_on(tmp_path):
    from lvit.eval.llava_bench import BenchQuestion, judge

    questions = [BenchQuestion(str(i), "a.jpg", "What is it?", "conv", "A cat.", "A cat.") for i in range(3)]
    answers = {q.id: "A cat." for q in questions}

    def responder(body, n):
        if n == 1:
            return Fault("400", text="prompt too long")
        return "8 7\nBoth are right."

    with ScriptedServer(responder) as server:
        scores = judge(questions, answers, tmp_path, _endpoint(server), concurrency=1)
    failures = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert scores["failed"] == 1 and failures[0]["failed"].startswith("endpoint_refused: the endpoint answered 400")


def test_a_401_still_stops_the_run_and_names_the_record(tmp_path):
    data, folder = _images(tmp_path, 3)
    tasks = plan(read_jsonl(data, folder), {"conversation": 1.0}, 3)
    with ScriptedServer(lambda body, n: Fault("401")) as server, pytest.raises(EndpointError) as info:
        generate(tasks, tmp_path / "o.jsonl", _endpoint(server), PROMPTS, concurrency=1, progress=False)
    assert "(asking for img0.png-conversation)" in str(info.value) and "--api-key-env" in str(info.value)


def test_cli_sends_crowd_boxes_as_groups_from_coco(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in (1, 2):
        Image.new("RGB", (100, 100)).save(folder / f"{i}.jpg")
    captions = [{"image_id": 1, "caption": "A crowd."}, {"image_id": 2, "caption": "A bench."}]
    crowd = [{"id": 1, "image_id": 1, "bbox": [0, 0, 50, 50], "category_id": 1, "iscrowd": 1},
             {"id": 2, "image_id": 2, "bbox": [0, 0, 50, 50], "category_id": 1, "iscrowd": 0}]  # fmt: skip
    caps, inst = _coco(tmp_path, [_img(1), _img(2)], captions, crowd)
    with ScriptedServer(lambda body, n: GOOD[kind_of(body)]) as server:
        args = ["data", "generate", "--coco-captions", str(caps), "--coco-instances", str(inst), "--image-folder"]
        args += [str(folder), "--out", str(tmp_path / "o.jsonl"), "--base-url", server.base_url, "--model", "m"]
        result = CliRunner().invoke(app, args)
        sent = server.user_texts()
    assert result.exit_code == 0, result.output
    assert any("person (a group): [0.000, 0.000, 0.500, 0.500]" in t for t in sent)
    assert any("person: [0.000, 0.000, 0.500, 0.500]" in t for t in sent)
