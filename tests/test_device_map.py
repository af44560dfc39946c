"""Device-map planning by budget (what lands on the executing device), and dispatching a sharded checkpoint."""

import copy

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch

from hcx_extend.cli import main
from hcx_extend.config import OmniConfig
from hcx_extend.memory import Workload, dispatch_checkpoint, estimate_memory, parse_budgets, plan_device_map
from hcx_extend.memory.dispatch import checkpoint_float_dtypes
from hcx_extend.memory.placement import LAYER_PREFIX, placement_units
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import PRESETS, build_preset, preset_config
from hcx_extend.units import parse_size

ORDER = {"cuda:0": 0, "cpu": 1, "disk": 2}
# hcx-omni-8b: vocabulary 200,704 x hidden 4,096, intermediate 12,288, bf16.
HEAD_BYTES = 200_704 * 4096 * 2
MLP_LINEAR_BYTES = 4096 * 12288 * 2
# A small text-only LLM for loading tests: GQA (4 query heads, 2 key/value heads), untied head.
SMALL_LLM = {"model_type": "hyperclovax", "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "max_position_embeddings": 256, "tie_word_embeddings": False}
IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
SHORT = Workload(batch=2, seq=12)

pytestmark = pytest.mark.usefixtures("one_thread")


def _devices_in_forward_order(plan):
    return [device for _, device in plan.placements]


def _layer_devices(plan):
    return {unit.names[0]: device for unit, device in plan.placements if unit.role == "layer"}


def test_sizes_and_budgets_parse_in_decimal_and_binary_units():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size(512) == 512
    assert list(parse_budgets(["disk=1TB", "cpu=64GB", "cuda:1=8GB", "cuda:0=24GB"])) == ["cuda:0", "cuda:1", "cpu", "disk"]


def test_units_know_what_accelerate_copies_in_per_module():
    units = placement_units(build_preset("hcx-omni-8b", device="meta"), torch.bfloat16)
    layer = next(u for u in units if u.role == "layer")
    head = units[-1]
    embeddings = next(u for u in units if u.role == "embeddings")
    assert layer.largest_module == MLP_LINEAR_BYTES  # gate/up/down_proj, each one Linear
    assert head.largest_module == HEAD_BYTES and head.buffers == 0
    # The rotary table is a float32 buffer of head_dim / 2 frequencies (and its original copy).
    assert embeddings.buffers in (64 * 4, 2 * 64 * 4)
    assert embeddings.nbytes == HEAD_BYTES + embeddings.buffers


def test_everything_fits_on_a_24gb_gpu_in_bf16_with_room_for_the_forward_pass():
    plan = plan_device_map(preset_config("hcx-omni-8b"), {"cuda:0": "24GB", "cpu": "64GB", "disk": "500GB"})
    assert set(plan.device_map.values()) == {0}
    assert plan.used("cuda:0") == pytest.approx(19.89e9, rel=0.01)
    assert plan.reserve == {}
    # 1 x 2048 tokens: at least the KV cache (36 layers x K and V x 8 heads x 128 x 2048 x 2 bytes) + a workspace.
    assert plan.activations["cuda:0"] > 36 * 2 * 8 * 128 * 2048 * 2 + 32 * 2**20
    assert plan.peak("cuda:0") == plan.used("cuda:0") + plan.activations["cuda:0"] <= 24 * 10**9


def test_auto_fills_devices_in_forward_order_and_counts_what_offloaded_units_bring_to_the_gpu():
    model = build_preset("hcx-omni-8b", device="meta")
    budgets = {"cuda:0": "8GB", "cpu": "6GB", "disk": "100GB"}
    plan = plan_device_map(model, budgets)
    ranks = [ORDER[d] for d in _devices_in_forward_order(plan)]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2}
    for device, budget in parse_budgets(budgets).items():
        assert plan.peak(device) <= budget
    # accelerate copies one module's weights in at a time: the largest offloaded one is the 1.64 GB head.
    assert plan.device_map["model.language_model.lm_head"] == "disk"
    assert plan.reserve["cuda:0"] == HEAD_BYTES
    assert all(not (key.startswith(LAYER_PREFIX) and "." in key[len(LAYER_PREFIX):]) for key in plan.device_map)
    placed = {name for name, _ in model.named_parameters() if any(name.startswith(k + ".") for k in plan.device_map)}
    assert placed == {name for name, _ in model.named_parameters()}
    assert "peak" in plan.table() and "activ." in plan.table()


def test_a_longer_forward_pass_leaves_fewer_layers_on_the_gpu():
    config = preset_config("hcx-omni-8b")
    budgets = {"cuda:0": "12GB", "cpu": "64GB"}
    short = plan_device_map(config, budgets, workload=Workload(batch=1, seq=512), modalities=[])
    long = plan_device_map(config, budgets, workload=Workload(batch=2, seq=8192), modalities=[])
    kv_per_token = 36 * 2 * 8 * 128 * 2  # layers x (K, V) x heads x head_dim x bf16
    assert long.activations["cuda:0"] - short.activations["cuda:0"] >= (2 * 8192 - 512) * kv_per_token
    on_gpu = [sum(d == "cuda:0" for d in _layer_devices(p).values()) for p in (short, long)]
    assert on_gpu[0] > on_gpu[1]


def test_encoders_on_cpu_keeps_projectors_and_llm_ends_on_the_gpu():
    plan = plan_device_map(preset_config("hcx-omni-8b"), ["cuda:0=12GB", "cpu=32GB"], "encoders-on-cpu")
    where = plan.device_map
    assert where["model.vision_model"] == where["model.audio_model"] == "cpu"
    assert where["model.mm_projector"] == where["model.audio_projector"] == 0
    assert where["model.language_model.model.embed_tokens"] == where["model.language_model.lm_head"] == 0
    layers = list(_layer_devices(plan).values())
    split = layers.index("cpu")
    assert split > 0 and layers == ["cuda:0"] * split + ["cpu"] * (36 - split)
    assert plan.peak("cuda:0") <= 12 * 10**9
    assert "layers 0-" in plan.table() and "vision_model" in plan.table()


def test_quantised_llm_needs_less_room():
    bf16 = plan_device_map(preset_config("hcx-omni-8b"), {"cuda:0": "11GB", "disk": "100GB"})
    nf4 = plan_device_map(preset_config("hcx-omni-8b"), {"cuda:0": "11GB", "disk": "100GB"}, quant="nf4")
    assert "disk" in bf16.device_map.values() and "disk" not in nf4.device_map.values()


def test_a_tied_head_travels_with_the_embeddings():
    raw = copy.deepcopy(PRESETS["tiny-hcx-omni"])
    raw["text_config"]["tie_word_embeddings"] = True
    with torch.device("meta"):
        units = placement_units(OmniForCausalLM(OmniConfig(**raw)))
    embeddings = next(u for u in units if u.role == "embeddings")
    assert "model.language_model.lm_head" in embeddings.names


@pytest.mark.parametrize("budgets, policy, message", [
    ({"gpu0": "24GB"}, "auto", "unknown device 'gpu0'"),
    ({"cuda:0": "-4GB", "cpu": "64GB"}, "auto", "must not be negative"),
    ({"cuda:0": "24 gigs"}, "auto", "cannot read size"),
    (["cuda:0:24GB"], "auto", "is not DEVICE=SIZE"),
    ({"cuda:0": "200MB", "cpu": "64GB"}, "auto", "cannot hold even one decoder layer"),
    ({"cuda:0": "4GB", "cpu": "4GB"}, "auto", "budgets add up to"),
    ({"cpu": "64GB"}, "encoders-on-cpu", "give a cuda:N budget"),
    ({"cuda:0": "24GB"}, "balanced", "unknown policy"),
    ({}, "auto", "no budgets"),
])
def test_bad_budgets_raise_clear_errors(budgets, policy, message):
    with pytest.raises(ValueError, match=message):
        plan_device_map(preset_config("hcx-omni-8b"), budgets, policy)


def test_a_cpu_budget_that_would_leave_every_unit_on_disk_is_refused():
    model = OmniForCausalLM(OmniConfig(text_config=dict(SMALL_LLM)))
    units = placement_units(model, torch.float32)
    # A layer + its forward pass fit, but once the 512 KB head in flight is kept too, not even the embeddings do.
    layer = next(u.nbytes for u in units if u.role == "layer")
    with pytest.raises(ValueError, match="holds no unit once it keeps room"):
        plan_device_map(model, {"cpu": layer + 200_000, "disk": "1GB"}, dtype=torch.float32, workload=SHORT)


def test_a_gpu_that_holds_a_layer_but_not_its_forward_pass_is_refused():
    config = preset_config("hcx-omni-8b")
    layer = next(u.nbytes for u in placement_units(build_preset("hcx-omni-8b", device="meta")) if u.role == "layer")
    workload = Workload(batch=4, seq=8192)
    activations = estimate_memory(config, "inference", workload, modalities=[], device="cuda")
    forward = activations.peak - activations.total("weights")
    with pytest.raises(ValueError, match="plus the activations"):
        plan_device_map(config, {"cuda:0": layer + forward // 2, "disk": "100GB"}, workload=workload, modalities=[])


# ---------------------------------------------------------------------------------------- dispatch
def _bf16_checkpoint(tmp_path):
    """A bf16 model with float32 rotary buffers (as transformers builds them), saved in small shards."""
    torch.manual_seed(0)
    model = OmniForCausalLM(OmniConfig(text_config=dict(SMALL_LLM))).eval()
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="200KB")
    with torch.no_grad():
        return model, model(input_ids=IDS).logits


def _cpu_budget_leaving_on_disk(model, dtype, count):
    """A CPU budget that holds all units but the last ``count``, plus what those bring in when they run
    (their buffers and their largest module) and the forward pass's activations."""
    units = placement_units(model, dtype)
    activations = plan_device_map(model, {"cpu": "1GB"}, dtype=dtype, workload=SHORT, modalities=[]).activations["cpu"]
    offloaded = units[-count:]
    return (sum(u.nbytes for u in units[:-count]) + activations + sum(u.buffers for u in offloaded)
            + max(u.largest_module for u in offloaded))


def test_dispatch_from_sharded_safetensors_with_disk_offload_reproduces_the_logits(tmp_path):
    model = build_preset("tiny-hcx-omni").eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="10MB")
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 1
    # Room on the CPU for everything but the last decoder layer and the LLM's head, which go to disk.
    cpu = _cpu_budget_leaving_on_disk(model, torch.float32, 2)
    plan = plan_device_map(model, {"cpu": cpu, "disk": "1GB"}, dtype=torch.float32, workload=SHORT, modalities=[])
    assert plan.device_map["model.language_model.lm_head"] == "disk"
    assert plan.reserve["cpu"] == placement_units(model, torch.float32)[-1].largest_module
    loaded = dispatch_checkpoint(tmp_path / "ckpt", plan, offload_folder=tmp_path / "offload")
    assert any((tmp_path / "offload").glob("*.dat"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)
    with pytest.raises(ValueError, match="offload_folder"):
        dispatch_checkpoint(tmp_path / "ckpt", plan)


@pytest.mark.parametrize("disk_layers", [0, 3])
def test_a_bf16_checkpoint_dispatches_in_bf16_with_identical_logits(tmp_path, disk_layers):
    model, expected = _bf16_checkpoint(tmp_path)
    assert checkpoint_float_dtypes(tmp_path / "ckpt") == {torch.bfloat16}
    plan = plan_device_map(model, {"cpu": "1GB", "disk": "1GB"}, dtype=torch.bfloat16, workload=SHORT)
    if disk_layers:  # the meta-weights + hooks path: the last layers and the head load from disk per module
        cpu = _cpu_budget_leaving_on_disk(model, torch.bfloat16, disk_layers + 1)
        plan = plan_device_map(model, {"cpu": cpu, "disk": "1GB"}, dtype=torch.bfloat16, workload=SHORT)
        assert sum(device == "disk" for _, device in plan.placements) == disk_layers + 1
    loaded = dispatch_checkpoint(tmp_path / "ckpt", plan, offload_folder=tmp_path / "offload")
    resident_dtypes = {p.dtype for p in loaded.parameters() if p.device.type != "meta"}
    assert resident_dtypes == {torch.bfloat16}
    assert loaded.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)
    with pytest.raises(ValueError, match="plan counted weights in bfloat16"):
        dispatch_checkpoint(tmp_path / "ckpt", plan, dtype="fp32", offload_folder=tmp_path / "offload")


def test_without_a_dtype_accelerate_casts_resident_weights_to_the_empty_models_float32(tmp_path):
    """The cause of the H200 mismatch (max |diff| 0.122, 3.44 GB for a 2.07 GB plan): accelerate's
    set_module_tensor_to_device casts a loaded tensor to the dtype of the empty model's parameter when no
    dtype is given, and a model built from a config is float32. dispatch_checkpoint always passes one."""
    model, expected = _bf16_checkpoint(tmp_path)
    plan = plan_device_map(model, {"cpu": "1GB"}, dtype=torch.bfloat16, workload=SHORT)
    with init_empty_weights():
        empty = OmniForCausalLM(OmniConfig(text_config=dict(SMALL_LLM)))
    loaded = load_checkpoint_and_dispatch(empty, str(tmp_path / "ckpt"), device_map=plan.device_map, dtype=None)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        logits = loaded(input_ids=IDS).logits
    assert logits.dtype == torch.float32 and not torch.equal(logits, expected.float())


def test_dispatch_plans_in_the_checkpoints_own_dtype_when_given_budgets(tmp_path):
    _, expected = _bf16_checkpoint(tmp_path)
    loaded = dispatch_checkpoint(tmp_path / "ckpt", budgets={"cpu": "1GB"})
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)


def test_plan_cli_prints_the_table_and_rejects_bad_budgets(capsys):
    assert main(["plan", "hcx-omni-8b", "--budget", "cuda:0=16GB", "--budget", "cpu=64GB", "--policy",
                 "encoders-on-cpu"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0" in out and "model.language_model.model.layers.0: 0" in out
    assert main(["plan", "hcx-omni-8b", "--budget", "tpu=16GB"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
