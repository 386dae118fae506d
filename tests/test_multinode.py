"""Several nodes: a 2-node torchrun rendezvous on this machine trains like one process; data is checked once.

- `test_two_nodes_train_like_one_process`: `torchrun --nnodes 2 --nproc-per-node 1` started twice (node ranks
  0 and 1; c10d rendezvous on 127.0.0.1; gloo on CPU), as two machines would start it, trains the tiny stage 2
  for 2 steps at per-device batch 4 x 1 accumulation x 2 processes; one process trains the same recipe at 4 x 2
  accumulation. The final weights and per-step losses agree (the tolerances and why are in
  tests/test_distributed.py, whose workspace and helpers this reuses).
- `test_data_is_checked_once_and_every_rank_gets_rank_zeros_records`: under two processes, rank 0 alone reads
  image headers and checks records (`lvit.data.shared.prepare_once`), rank 1 opens no image, and both end with
  the same rows, skipped records and errors.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml
from test_distributed import (
    LOSS_REL,
    WEIGHT_ATOL,
    WEIGHT_RTOL,
    _accumulation,
    _launch,
    _weights,
    workspace,  # noqa: F401 - a fixture
)

pytestmark = pytest.mark.slow

STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[dict]:
    state = json.loads((run / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_two_nodes_train_like_one_process(workspace):  # noqa: F811 - the fixture imported above
    import torch

    root, recipe = workspace["root"], str(workspace["recipe"])
    port = _free_port()
    outs = {name: root / f"run-{name}" for name in ("single", "nodes")}
    finetune = ["-m", "lvit", "finetune", recipe, f"training.max_steps={STEPS}", f"training.save_steps={STEPS}"]
    rendezvous = [
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lvit-two-nodes",
    ]  # fmt: skip
    nodes_out = f"training.output_dir={outs['nodes']}"
    commands = {
        "single": [sys.executable, *finetune, f"training.output_dir={outs['single']}"],
        **{
            f"node{rank}": [sys.executable, *rendezvous, "--node-rank", str(rank), *finetune, nodes_out]
            for rank in (0, 1)
        },
    }
    _launch(commands, root)

    assert _accumulation(outs["single"]) == 2 and _accumulation(outs["nodes"]) == 1  # really 2 processes
    log = (root / "node0.log").read_text() + (root / "node1.log").read_text()
    assert "2 process(es)" in log
    single, nodes = _weights(outs["single"]), _weights(outs["nodes"])
    assert single.keys() == nodes.keys()
    mismatched = {
        name: (single[name] - nodes[name]).abs().max().item()
        for name in single
        if not torch.allclose(single[name], nodes[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
    }
    assert not mismatched, f"tensors differ between 1 process and 2 nodes (max abs diff): {mismatched}"
    one, two = _losses(outs["single"]), _losses(outs["nodes"])
    assert [e["step"] for e in two] == [e["step"] for e in one] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in two] == pytest.approx([e["loss"] for e in one], rel=LOSS_REL)
    assert [e["num_tokens"] for e in two] == [e["num_tokens"] for e in one]


# Run by two processes: prepare the data with `prepare_once`, write what this rank got.
_PREPARE = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")
import lvit.data.check as check_module
import lvit.data.dataset as dataset_module
from lvit.data.shared import prepare_once
from lvit.errors import LvitError
from lvit.model.processor import load_tokenizer
from lvit.recipe.schema import DataSection
from lvit.templates.encoder import ConversationEncoder

lm, path, images, out = sys.argv[1:]
calls = {}
def counted(name, fn):
    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)
    return wrapper
dataset_module.inspect_data = counted("inspect", dataset_module.inspect_data)
check_module.probe_image = counted("probe", check_module.probe_image)
tokenizer = load_tokenizer(lm)
encoder = ConversationEncoder("vicuna_v1", tokenizer, tokenizer.convert_tokens_to_ids("<image>"), 16)
for on_bad in ("skip", "error"):
    calls.clear()
    data = DataSection(path=path, image_folder=images, on_bad_record=on_bad, max_length=256)
    result = {"rank": dist.get_rank()}
    try:
        prepared = prepare_once(data, encoder, "<test>")
        result["rows"] = prepared.dataset.to_list()
        result["skipped"] = [vars(s) for s in prepared.skipped]
        result["total"] = prepared.total
    except LvitError as exc:
        result["error"] = str(exc)
    result["calls"] = dict(calls)
    with open(f"{out}/{on_bad}-rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
dist.barrier()  # neither rank tears the group down while the other still uses it
dist.destroy_process_group()
"""


def test_data_is_checked_once_and_every_rank_gets_rank_zeros_records(workspace, tmp_path):  # noqa: F811
    root = workspace["root"]
    recipe = yaml.safe_load(workspace["recipe"].read_text())
    records = json.loads(Path(recipe["data"]["path"]).read_text())[:12]
    records[3] = {**records[3], "image": "missing.png"}  # left out under skip, an error otherwise
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    script = tmp_path / "prepare.py"
    script.write_text(_PREPARE)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(workspace["lm"]), str(data), recipe["data"]["image_folder"], str(tmp_path)]
    _launch({"prepare": [*launch, str(script), *args]}, root)
    results = {
        on_bad: [json.loads((tmp_path / f"{on_bad}-rank{r}.json").read_text()) for r in (0, 1)]
        for on_bad in ("skip", "error")
    }

    zero, one = results["skip"]
    assert zero["calls"]["inspect"] == 1 and zero["calls"]["probe"] > 0
    assert one["calls"] == {}  # rank 1 checked nothing and opened no image
    assert len(zero["rows"]) == 11 and one["rows"] == zero["rows"]  # the same records, in the same order
    assert [s["index"] for s in zero["skipped"]] == [3] and one["skipped"] == zero["skipped"]
    assert one["total"] == zero["total"] == 12

    zero, one = results["error"]
    assert "image not found" in zero["error"] and one["error"] == zero["error"]  # rank 1 stops too, same message
    assert one["calls"] == {}


# Run by two processes: prepare a mixture with `prepare_once`, write each rank's rows and its sampler's epochs.
_MIXTURE = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")
import lvit.data.check as check_module
from lvit.data.mixture_sampler import MixtureSampler
from lvit.data.shared import prepare_once
from lvit.model.processor import load_tokenizer
from lvit.recipe.schema import DataSection, SourceSection
from lvit.templates.encoder import ConversationEncoder

lm, ours, captions, images, out = sys.argv[1:]
probes = []
check_module.probe_image = (lambda fn: lambda *a, **k: probes.append(1) or fn(*a, **k))(check_module.probe_image)
tokenizer = load_tokenizer(lm)
encoder = ConversationEncoder("vicuna_v1", tokenizer, tokenizer.convert_tokens_to_ids("<image>"), 16)
sources = [SourceSection(path=ours, name="ours", weight=3), SourceSection(path=captions, weight=1)]
data = DataSection(sources=sources, image_folder=images, max_length=256, samples_per_epoch=40)
prepared = prepare_once(data, {"vicuna_v1": encoder}, "<test>")
sampler = MixtureSampler(prepared.plan, seed=11)
epochs = []
for epoch in (0, 1):
    sampler.set_epoch(epoch)
    epochs.append([prepared.dataset[r]["id"] for r in sampler])
result = {"rows": prepared.dataset.to_list(), "per_epoch": prepared.plan.per_epoch, "epochs": epochs}
result["probes"] = len(probes)
with open(f"{out}/mixture-rank{dist.get_rank()}.json", "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_a_mixture_draws_the_same_records_on_every_rank(workspace, tmp_path):  # noqa: F811
    root = workspace["root"]
    recipe = yaml.safe_load(workspace["recipe"].read_text())
    instruct = Path(recipe["data"]["path"])
    captions = instruct.with_name("captions.json")
    script = tmp_path / "mixture.py"
    script.write_text(_MIXTURE)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(workspace["lm"]), str(instruct), str(captions), recipe["data"]["image_folder"], str(tmp_path)]
    _launch({"mixture": [*launch, str(script), *args]}, root)
    zero, one = (json.loads((tmp_path / f"mixture-rank{r}.json").read_text()) for r in (0, 1))
    assert zero["probes"] > 0 and one["probes"] == 0  # rank 0 checked, rank 1 rebuilt rank 0's records
    assert one["rows"] == zero["rows"] and one["per_epoch"] == zero["per_epoch"]
    assert one["epochs"] == zero["epochs"] and zero["epochs"][0] != zero["epochs"][1]
    n_ours, n_captions = zero["per_epoch"]
    assert (n_ours, n_captions) == (30, 10)
    assert all(sum(i.startswith("cap-") for i in epoch) == n_captions for epoch in zero["epochs"])
