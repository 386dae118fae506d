"""`lvit data generate`: inputs, the plan, the reply checks, and whole runs against a scripted server on 127.0.0.1."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image
from scripted_server import Fault, ScriptedServer
from typer.testing import CliRunner

from lvit.cli.app import app
from lvit.data.check import check_data
from lvit.data.generate import PAPER_MIX, generate, load_prompts, parse_reply, plan, read_coco, read_jsonl
from lvit.data.generate import run as run_module
from lvit.data.generate.contexts import ImageContext
from lvit.errors import Interrupted, LvitError
from lvit.llm.endpoint import Endpoint, EndpointError

GOOD = {
    "conversation": "Question: What is in the image?\nAnswer: A red square on a white background.\n"
    "===\nQuestion: Where is the square?\nAnswer: It sits in the middle of the picture.",
    "detail": "The image shows a red square in the middle of a plain white background, with nothing else around it.",
    "complex": "Question: Why might someone draw this?\nAnswer: It looks like a test card, used to check the colours.",
}
PROMPTS = load_prompts()


def kind_of(body: dict) -> str:
    system = body["messages"][0]["content"]
    return next(k for k, p in PROMPTS.items() if p.system == system)


def _images(tmp_path, n: int) -> tuple:
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 20), (200, 10 * i, 10)).save(folder / f"img{i}.png")
        rows.append(
            {
                "image": f"img{i}.png",
                "captions": [f"A red square number {i}.", "A square on white."],
                "boxes": [{"label": "square", "bbox": [4, 2, 20, 18]}],
            }
        )
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, folder


def _endpoint(server, **kw) -> Endpoint:
    return Endpoint(server.base_url, "scripted", timeout=kw.pop("timeout", 2.0), retries=6, backoff=0.01, **kw)


def _ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_the_plan_follows_the_mix_and_a_longer_plan_extends_a_shorter_one():
    contexts = [ImageContext(f"c{i}", f"{i}.png", ["x"]) for i in range(200)]
    tasks = plan(contexts, PAPER_MIX, 158)  # one pass over the images: the smooth round robin exactly
    assert Counter(t.kind for t in tasks) == {"conversation": 58, "detail": 23, "complex": 77}
    assert len({t.id for t in tasks}) == 158 and all(t.variant == 0 for t in tasks)
    contexts = contexts[:10]
    tasks = plan(contexts, PAPER_MIX, 158)
    assert [t.id for t in plan(contexts, PAPER_MIX, 40)] == [t.id for t in tasks[:40]]
    assert tasks[10].context.id == "c0" and tasks[10].kind != tasks[0].kind  # the second pass: another kind
    assert len({t.id for t in tasks}) == 158
    for n in range(1, 159):  # every prefix within three records of the mix
        counts = Counter(t.kind for t in tasks[:n])
        assert all(abs(counts[k] - n * w / 158) <= 3 for k, w in PAPER_MIX.items()), (n, counts)


@pytest.mark.parametrize("mix", [PAPER_MIX, {"conversation": 1.0, "detail": 1.0, "complex": 1.0}])
def test_later_rounds_never_repeat_a_request(mix):
    """--records = 3 x images: an image gets a kind it has not had where the mix allows, and a forced repeat
    (the paper's mix holds more complex records than images) asks for another variant: no request twice."""
    contexts = [ImageContext(f"c{i}", f"{i}.png", [f"caption {i}"]) for i in range(20)]
    tasks = plan(contexts, mix, 60)
    requests = [json.dumps(t.messages(PROMPTS)) for t in tasks]
    assert len(set(requests)) == 60
    repeats = Counter((t.context.id, t.kind) for t in tasks)
    forced = sum(max(0, n - 20) for n in Counter(t.kind for t in tasks).values())
    assert sum(n - 1 for n in repeats.values()) == sum(t.variant > 0 for t in tasks) >= forced
    if len(set(mix.values())) == 1:
        assert max(repeats.values()) == 1  # an even mix: every image gets each kind once
    else:
        assert sum(t.variant > 0 for t in tasks) <= forced + 10
        assert "Write variant 2" in next(r for r, t in zip(requests, tasks, strict=True) if t.variant == 1)


def test_coco_boxes_become_normalised_corners_with_category_names(tmp_path):
    caps = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 100}],
        "annotations": [{"image_id": 7, "caption": "A  dog on grass. "}, {"image_id": 7, "caption": "A dog."}],
    }
    inst = {
        "annotations": [{"id": 1, "image_id": 7, "bbox": [20, 10, 50, 40], "category_id": 18}],
        "categories": [{"id": 18, "name": "dog"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(caps))
    (tmp_path / "i.json").write_text(json.dumps(inst))
    (ctx,) = read_coco(tmp_path / "c.json", tmp_path / "i.json")
    assert ctx.id == "7" and ctx.image == "a.jpg" and ctx.captions == ["A dog on grass.", "A dog."]
    assert ctx.boxes[0].label == "dog" and ctx.boxes[0].bbox == pytest.approx((0.1, 0.1, 0.35, 0.5))
    assert "dog: [0.100, 0.100, 0.350, 0.500]" in ctx.text()


def test_jsonl_input_errors_name_the_line_and_the_fix(tmp_path):
    rows = [
        {"image": "a.png", "captions": ["ok"], "boxes": [{"label": "cat", "bbox": [0.1, 0.2, 0.3, 0.4]}]},
        {"image": "b.png", "captions": []},
        {"image": "c.png", "captions": "one", "boxes": [{"label": "cat", "bbox": [0.5, 0.2, 0.3, 0.4]}]},
        {"id": "x", "captions": ["no image"]},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LvitError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert "3 record(s)" in message
    assert "line 2 (id 'b.png'): needs \"captions\"" in message
    assert "line 3 (id 'c.png'): box 0 (cat)" in message and "x1 <= x2" in message
    assert 'line 4: needs "image"' in message


def test_pixel_boxes_are_divided_by_the_image_size(tmp_path):
    data, folder = _images(tmp_path, 1)
    (ctx,) = read_jsonl(data, folder)
    assert ctx.boxes[0].bbox == pytest.approx((0.1, 0.1, 0.5, 0.9))  # [4, 2, 20, 18] in a 40x20 image


@pytest.mark.parametrize(
    ("kind", "text", "finish", "reason"),
    [
        ("conversation", GOOD["conversation"], "length", "truncated"),
        ("conversation", "  ", "stop", "empty"),
        ("conversation", "Question: hi\x00\nAnswer: x", "stop", "unreadable"),
        ("conversation", "v\ufffdef\ufffden{z", "stop", "unreadable"),
        ("conversation", "Just some words about the picture.", "stop", "no_turns"),
        ("conversation", "A scene.\nA dog runs.\nIt is sunny.\nQuestion: a?\nAnswer: b.", "stop", "text_outside_turns"),
        ("conversation", "Question: a?\nQuestion: b?\nAnswer: c.", "stop", "not_alternating"),
        ("conversation", "Question: a?\nAnswer: b.\nQuestion: c?", "stop", "not_alternating"),
        ("conversation", "Question: a?\nAnswer:\nQuestion: c?\nAnswer: d.", "stop", "empty_turn"),
        ("conversation", "Captions:\nA dog.\nQuestion: a?\nAnswer: b.", "stop", "leftover_prompt"),
        ("complex", GOOD["conversation"], "stop", "wrong_count"),
        (
            "detail",
            "Question: what?\nAnswer: a long enough description of the whole scene here.",
            "stop",
            "leftover_prompt",
        ),
        ("detail", "A square.", "stop", "too_short"),
    ],
)
def test_bad_replies_are_rejected_with_their_reason(kind, text, finish, reason):
    with pytest.raises(Exception) as info:
        parse_reply(kind, text, finish)
    assert getattr(info.value, "reason", None) == reason, info.value


def test_good_replies_parse_into_alternating_turns():
    assert parse_reply("conversation", GOOD["conversation"]).pairs == [
        ("What is in the image?", "A red square on a white background."),
        ("Where is the square?", "It sits in the middle of the picture."),
    ]
    assert parse_reply("complex", "**Question:** Why?\n**Answer:** Because.").pairs == [("Why?", "Because.")]
    assert parse_reply("detail", GOOD["detail"]).pairs == [("", GOOD["detail"])]
    assert parse_reply("detail", GOOD["detail"]).cleaned == ()


def test_a_run_through_faults_loses_and_duplicates_nothing_and_its_output_checks(tmp_path):
    """24 records, 4 in flight; 429s, 500s, dropped connections and a slow answer along the way, and some
    garbage replies: every planned record ends up exactly once in the output or the rejects."""
    data, folder = _images(tmp_path, 8)
    faults = {1: Fault("429", retry_after="0"), 4: Fault("500"), 6: Fault("drop"), 9: Fault("slow", seconds=3)}

    def responder(body, n):
        if n in faults:
            return faults[n]
        if n % 6 == 5:
            return "not what was asked for"
        return GOOD[kind_of(body)]

    tasks = plan(read_jsonl(data, folder), PAPER_MIX, 24)
    out = tmp_path / "out" / "instruct.jsonl"
    with ScriptedServer(responder) as server:
        summary = generate(tasks, out, _endpoint(server, timeout=1.0), PROMPTS, concurrency=4, progress=False)
    written, rejected = _ids(out), _ids(out.with_name("instruct.rejects.jsonl"))
    assert len(written) == len(set(written)) and not set(written) & set(rejected)
    assert sorted(written + rejected) == sorted(t.id for t in tasks)
    assert sum(summary.written.values()) == len(written) and sum(summary.rejected.values()) == len(rejected) > 0
    assert len(server.requests) == summary.usage.requests + summary.usage.retries == 24 + 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {t.id: t for t in tasks}
    for row in rows:
        assert row["kind"] == by_id[row["id"]].kind and row["source_id"] == by_id[row["id"]].context.id
        assert row["conversations"][0]["value"].startswith("<image>\n")
    reject = json.loads(out.with_name("instruct.rejects.jsonl").read_text().splitlines()[0])
    assert reject["reason"] == "no_turns" or reject["kind"] == "detail"
    assert reject["raw"] == "not what was asked for"
    report = check_data(out, image_folder=folder)
    assert report.ok and report.summary()["trainable"] == len(written), report.format_text()
    assert "detail" in summary.format_text() and summary.usage.prompt_tokens == 10 * 24


def test_ctrl_c_keeps_what_was_written_and_the_rerun_completes_without_duplicates(tmp_path, monkeypatch):
    data, folder = _images(tmp_path, 6)
    tasks = plan(read_jsonl(data, folder), PAPER_MIX, 12)
    out = tmp_path / "instruct.jsonl"
    calls = []
    real_parse = run_module.parse_reply

    def parse_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(run_module, "parse_reply", parse_then_interrupt)
    with (
        ScriptedServer(lambda body, n: GOOD[kind_of(body)]) as server,
        pytest.raises(Interrupted, match=r"keeps 4 records \(4 from this run\)"),
    ):
        generate(tasks, out, _endpoint(server), PROMPTS, concurrency=2, progress=False)
    assert len(_ids(out)) == 4
    with out.open("a") as f:  # a crash in the middle of writing a line
        f.write('{"id": "img5.png-conv')
    monkeypatch.setattr(run_module, "parse_reply", real_parse)
    with ScriptedServer(lambda body, n: GOOD[kind_of(body)]) as server:
        summary = generate(tasks, out, _endpoint(server), PROMPTS, concurrency=2, progress=False)
        assert len(server.requests) == 8 and summary.skipped == 4
    assert sorted(_ids(out)) == sorted(t.id for t in tasks)
    with ScriptedServer(lambda body, n: GOOD[kind_of(body)]) as server:  # a third run has nothing to do
        generate(tasks, out, _endpoint(server), PROMPTS, progress=False)
        assert server.requests == []


def test_401_stops_the_run_with_the_fix_and_says_what_was_kept(tmp_path):
    data, folder = _images(tmp_path, 4)
    tasks = plan(read_jsonl(data, folder), PAPER_MIX, 4)
    out = tmp_path / "instruct.jsonl"
    with (
        ScriptedServer(lambda body, n: GOOD[kind_of(body)] if n < 2 else Fault("401")) as server,
        pytest.raises(EndpointError, match=r"--api-key-env(.|\n)*keeps 2 records"),
    ):
        generate(tasks, out, _endpoint(server), PROMPTS, concurrency=1, progress=False)
    assert len(_ids(out)) == 2


def test_cli_dry_run_prints_the_first_request_and_sends_nothing(tmp_path, monkeypatch):
    data, folder = _images(tmp_path, 2)
    monkeypatch.setenv("LVIT_TEST_KEY", "sk-do-not-print")
    with ScriptedServer(lambda body, n: "x") as server:
        args = ["data", "generate", str(data), "--image-folder", str(folder), "--out", str(tmp_path / "o.jsonl")]
        args += ["--base-url", server.base_url, "--model", "m", "--api-key-env", "LVIT_TEST_KEY", "--dry-run"]
        result = CliRunner().invoke(app, args)
        assert server.requests == []
    assert result.exit_code == 0, result.output
    assert f"POST {server.base_url}/chat/completions" in result.output and "Bearer ***" in result.output
    assert PROMPTS["conversation"].system.splitlines()[0] in result.output and "sk-do-not" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_uses_the_users_prompt_files_and_prints_the_summary(tmp_path):
    data, folder = _images(tmp_path, 3)
    mine = tmp_path / "my_prompts"
    mine.mkdir()
    (mine / "complex.yaml").write_text("system: My own reasoning prompt.\nexamples: []\n")
    with ScriptedServer(lambda body, n: GOOD["complex"]) as server:
        args = ["data", "generate", str(data), "--image-folder", str(folder), "--out", str(tmp_path / "o.jsonl")]
        args += ["--base-url", server.base_url, "--model", "m", "--prompts", str(mine), "--mix", "complex=1"]
        args += ["--price-input", "2", "--price-output", "8"]
        result = CliRunner().invoke(app, args)
        systems = {r.body["messages"][0]["content"] for r in server.requests}
    assert result.exit_code == 0, result.output
    assert systems == {"My own reasoning prompt."}
    assert "written this run: 3 (conversation 0, detail 0, complex 3)" in result.output
    assert "cost: 0.00018 " in result.output  # (3 * 10 * 2 + 3 * 5 * 8) / 1e6 = 0.00018


def test_cli_input_errors_come_before_any_request(tmp_path):
    data, _ = _images(tmp_path, 2)
    result = CliRunner().invoke(
        app,
        ["data", "generate", str(data), "--out", str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1"]
        + ["--model", "m", "--image-folder", str(tmp_path / "nowhere")],
    )
    assert result.exit_code == 2 and "line 1 (id 'img0.png'): box 0 (square)" in result.output
    assert "in pixels but the image cannot be read" in result.output and "--image-folder" in result.output


def test_cli_from_coco_annotations_sends_the_boxes_and_keeps_the_image_id(tmp_path):
    folder = tmp_path / "train2014"
    folder.mkdir()
    Image.new("RGB", (200, 100)).save(folder / "COCO_7.jpg")
    caps = {
        "images": [{"id": 7, "file_name": "COCO_7.jpg", "width": 200, "height": 100}],
        "annotations": [{"image_id": 7, "caption": "A dog on grass."}],
    }
    inst = {
        "annotations": [{"id": 1, "image_id": 7, "bbox": [20, 10, 50, 40], "category_id": 18}],
        "categories": [{"id": 18, "name": "dog"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    out = tmp_path / "o.jsonl"
    with ScriptedServer(lambda body, n: GOOD[kind_of(body)]) as server:
        args = ["data", "generate", "--coco-captions", str(tmp_path / "captions.json"), "--coco-instances"]
        args += [str(tmp_path / "instances.json"), "--image-folder", str(folder), "--out", str(out)]
        args += ["--base-url", server.base_url, "--model", "m", "--mix", "conversation=1"]
        result = CliRunner().invoke(app, args)
        sent = server.requests[0].body["messages"][-1]["content"]
    assert result.exit_code == 0, result.output
    assert sent.startswith("Captions:\nA dog on grass.") and "dog: [0.100, 0.100, 0.350, 0.500]" in sent
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "7-conversation" and row["source_id"] == "7" and row["image"] == "COCO_7.jpg"
    result = CliRunner().invoke(app, [*args[:2], *args[4:]])  # --coco-instances without --coco-captions
    assert result.exit_code == 2 and "pass either INPUT" in result.output
