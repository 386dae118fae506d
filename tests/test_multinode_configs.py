"""The multi-node accelerate configs (recipes/accelerate/*_multinode.yaml) and the SLURM script that uses them.

accelerate's own launcher code turns a config plus the per-node overrides the SLURM script passes
(`--machine_rank`, `--main_process_ip`, `--num_machines`, `--num_processes`) into the torchrun arguments
each node starts its processes with; nothing is launched (as tests/test_launch_configs.py does for one node).
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "accelerate"
SLURM = REPO / "examples" / "slurm" / "lvit_multinode.sbatch"


def _node_args(config: Path, overrides: list[str], monkeypatch):
    """accelerate's launch arguments for one node, after its validation and per-launcher preparation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(REPO)
    argv = ["--config_file", str(config), *overrides, "-m", "lvit", "finetune", "recipes/llava15_stage2.yaml"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config.keys())
        cmd, _ = prepare_deepspeed_cmd_env(args)
        assert cmd is None  # the `standard` launcher: torchrun on each node, not the deepspeed/pdsh launcher
    else:
        prepare_multi_gpu_env(args)
    return args


@pytest.mark.parametrize("name", ["fsdp_multinode.yaml", "deepspeed_zero3_multinode.yaml"])
@pytest.mark.parametrize(("nodes", "rank"), [(2, 1), (4, 3)])
def test_each_node_gets_its_rank_and_the_first_nodes_address(name, nodes, rank, monkeypatch):
    overrides = ["--num_machines", str(nodes), "--num_processes", str(8 * nodes), "--machine_rank", str(rank)]
    args = _node_args(CONFIGS / name, [*overrides, "--main_process_ip", "10.1.2.3"], monkeypatch)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == (str(nodes), "8", rank)
    # static rendezvous at the first node (docs/stack-notes.md#accelerate-launch-cli-only)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.1.2.3:29500")


def test_the_slurm_script_passes_what_each_node_needs():
    script = SLURM.read_text()
    assert script.startswith("#!/bin/bash")
    for needed in ("--machine_rank", "--main_process_ip", "--num_machines", "--num_processes", "srun"):
        assert needed in script
    assert "recipes/accelerate/deepspeed_zero3_multinode.yaml" in script and "exit 143" not in script
