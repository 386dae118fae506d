"""The shipped `accelerate launch` configs (recipes/accelerate/) parse and build their plugins, without a GPU.

Each config goes through accelerate's own launcher code: the `accelerate launch` argument parser, its config
validation (`_validate_launch_command`) and the environment it hands to the training processes
(`prepare_multi_gpu_env` / `prepare_deepspeed_cmd_env`). The plugin is then built from that environment, as
`Accelerator` / `TrainingArguments` build it in each process. Nothing is launched and no training runs (FSDP
and DeepSpeed cannot train on CPU here; see docs/stack-notes.md#fsdp-deepspeed-on-cpu).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "accelerate"
FSDP_YAML = CONFIGS / "fsdp_8gpu.yaml"
ZERO3_YAML = CONFIGS / "deepspeed_zero3_8gpu.yaml"
ZERO3_JSON = CONFIGS / "zero3.json"
LAUNCHED = ["-m", "lvit", "finetune", "recipes/llava_stage2.yaml"]  # the documented command's script part


def _launch(config_file: Path, monkeypatch) -> tuple:
    """Run accelerate's launcher up to the point where it would start the processes.

    Returns `(args, defaults, env)`; `env` (the training processes' environment) is also applied to this
    process with `monkeypatch`, so a plugin built afterwards reads it as a launched process would.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(REPO)  # the documented command runs from the repository root (relative JSON path)
    args = launch_command_parser().parse_args(["--config_file", str(config_file), *LAUNCHED])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        # as `accelerate.commands.launch.launch_command` does before `deepspeed_launcher`
        fields = list(defaults.deepspeed_config.keys())
        if mp_from_config:
            fields.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return args, defaults, env


def _tiny_llava_on_meta():
    """A LLaVA (CLIP + Llama) with the tiny sizes, on the meta device: module classes only, no memory."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from lvit.demo.tiny import TINY_TEXT, TINY_VISION

    config = LlavaConfig(vision_config=CLIPVisionConfig(**TINY_VISION), text_config=LlamaConfig(**TINY_TEXT))
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def test_fsdp_config_builds_the_fsdp2_plugin(monkeypatch):
    import torch
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    args, defaults, env = _launch(FSDP_YAML, monkeypatch)
    assert defaults.distributed_type == DistributedType.FSDP
    assert defaults.num_processes == 8 and args.num_processes == 8 and args.nproc_per_node == "8"
    assert defaults.mixed_precision == "bf16" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["ACCELERATE_USE_FSDP"] == "true"

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as Accelerator does
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    # Trainer.save_model writes weights under FSDP only with a full state dict (see the YAML's comment)
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.activation_checkpointing is False

    # The mixed-precision policy Accelerator derives from the launcher's ACCELERATE_MIXED_PRECISION.
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    # fp32 masters, bf16 compute: the sharded parameters keep their own dtype (fp32 for what trains: lvit up-casts
    # it, and accelerate 1.15's `fsdp2_prepare_model` does too when mixed precision is not "no", except for 4-bit
    # models; read in accelerate/utils/fsdp_utils.py) and the policy casts only the gathered copy used for
    # compute (torch's MixedPrecisionPolicy: param_dtype is the compute dtype of the all-gathered parameters).
    assert defaults.mixed_precision != "no"  # accelerate's up-cast condition
    assert plugin.mixed_precision_policy.param_dtype != torch.float32  # compute in bf16, not fp32

    # The wrap classes exist in a LLaVA model (accelerate raises if a name matches no module) and each CLIP
    # encoder layer and Llama decoder layer becomes its own unit.
    model = _tiny_llava_on_meta()
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    n_vision = model.config.vision_config.num_hidden_layers
    n_text = model.config.text_config.num_hidden_layers
    assert sorted(wrapped) == sorted(["CLIPEncoderLayer"] * n_vision + ["LlamaDecoderLayer"] * n_text)


def _zero3() -> dict:
    return json.loads(ZERO3_JSON.read_text())


def test_zero3_json_is_llavas_zero3():
    config = _zero3()
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the run folder gets full 16-bit weights
    assert config["bf16"]["enabled"] == "auto"
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert config[key] == "auto", f"{key} must be 'auto' so lvit's derived batch/accumulation fill it"
    assert "LLaVA" in ZERO3_YAML.read_text(), "the DeepSpeed YAML should name LLaVA's repo as the JSON's source"


def test_deepspeed_config_builds_the_zero3_plugin(monkeypatch):
    # DeepSpeedPlugin is plain accelerate code: it parses and checks the JSON without the deepspeed package.
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    args, defaults, env = _launch(ZERO3_YAML, monkeypatch)
    assert defaults.distributed_type == DistributedType.DEEPSPEED
    assert defaults.num_processes == 8 and args.num_processes == 8 and args.nproc_per_node == "8"
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).resolve() == ZERO3_JSON.resolve()  # recipes/ is a symlink

    # As TrainingArguments builds it under `accelerate launch`; raises if the YAML sets values that the JSON
    # owns (mixed_precision, zero_stage, gradient_accumulation_steps, ...).
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 3
    assert plugin.hf_ds_config.is_zero3()
    assert plugin.zero3_init_flag is True
    assert plugin.zero3_save_16bit_model is True

    # Precision: TrainingArguments passes its own mixed_precision, "bf16" for the recipe's training.bf16=true
    # (SFTConfig's default), which fills the JSON's "auto".
    plugin.set_mixed_precision("bf16")
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    assert plugin.deepspeed_config["fp16"]["enabled"] is False
    # fp32 masters: with bf16 enabled, DeepSpeed's ZeRO optimizer keeps fp32 partitions of the weights and Adam
    # state (docs/stack-notes.md#bf16-no-master-weights: DeepSpeed's ZeRO docs and runtime/engine.py; read, not run).
    # lvit leaves the dtypes to DeepSpeed (tests/test_precision.py). The bf16 section is DeepSpeed's default
    # scheme, nothing else, and the optimizer is the Trainer's AdamW, which ZeRO wraps with its fp32 state.
    assert set(plugin.deepspeed_config["bf16"]) == {"enabled"}
    assert "optimizer" not in plugin.deepspeed_config


def test_deepspeed_yaml_must_not_set_mixed_precision(monkeypatch, tmp_path):
    """Why the DeepSpeed YAML has no `mixed_precision:`: accelerate rejects it next to a JSON config file."""
    from accelerate.utils import DeepSpeedPlugin

    raw = yaml.safe_load(ZERO3_YAML.read_text())
    raw["mixed_precision"] = "bf16"
    bad = tmp_path / "zero3_with_mixed_precision.yaml"
    bad.write_text(yaml.safe_dump(raw))
    _launch(bad, monkeypatch)
    with pytest.raises(ValueError, match="will be ignored"):
        DeepSpeedPlugin()


def test_zero3_json_passes_deepspeeds_own_schema():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (the optional extra '.[deepspeed]')")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    # The Trainer replaces "auto" with numbers from the model's hidden size; any number validates here.
    zero = {key: 1000 if value == "auto" else value for key, value in _zero3()["zero_optimization"].items()}
    parsed = DeepSpeedZeroConfig(**zero)  # pydantic: unknown or misspelt keys raise
    assert int(parsed.stage) == 3
    assert parsed.gather_16bit_weights_on_model_save is True
    assert parsed.overlap_comm is True and parsed.contiguous_gradients is True
