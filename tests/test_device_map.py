"""Device-map planning by budget, and dispatching a sharded checkpoint with disk offload."""

import copy

import pytest
import torch

from hcx_extend.cli import main
from hcx_extend.config import OmniConfig
from hcx_extend.memory import dispatch_checkpoint, parse_budgets, plan_device_map
from hcx_extend.memory.device_map import LAYER_PREFIX, placement_units
from hcx_extend.units import parse_size
from hcx_extend.model import OmniForCausalLM
from hcx_extend.presets import PRESETS, build_preset, preset_config

ORDER = {"cuda:0": 0, "cpu": 1, "disk": 2}

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


def test_everything_fits_on_a_24gb_gpu_in_bf16():
    plan = plan_device_map(preset_config("hcx-omni-8b"), {"cuda:0": "24GB", "cpu": "64GB", "disk": "500GB"})
    assert set(plan.device_map.values()) == {0}
    assert plan.used("cuda:0") == pytest.approx(19.89e9, rel=0.01)
    assert plan.reserve == {}


def test_auto_fills_devices_in_forward_order_within_budgets_and_keeps_layers_whole():
    model = build_preset("hcx-omni-8b", device="meta")
    budgets = {"cuda:0": "8GB", "cpu": "6GB", "disk": "100GB"}
    plan = plan_device_map(model, budgets)
    ranks = [ORDER[d] for d in _devices_in_forward_order(plan)]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2}
    for device, budget in parse_budgets(budgets).items():
        assert plan.used(device) + plan.reserve.get(device, 0) <= budget
    # Offloaded units are executed on the GPU: room for the largest one is kept there.
    offloaded = [u.nbytes for u, d in plan.placements if d != "cuda:0"]
    assert plan.reserve["cuda:0"] == max(offloaded)
    assert all(not (key.startswith(LAYER_PREFIX) and "." in key[len(LAYER_PREFIX):]) for key in plan.device_map)
    placed = {name for name, _ in model.named_parameters() if any(name.startswith(k + ".") for k in plan.device_map)}
    assert placed == {name for name, _ in model.named_parameters()}


def test_encoders_on_cpu_keeps_projectors_and_llm_ends_on_the_gpu():
    plan = plan_device_map(preset_config("hcx-omni-8b"), ["cuda:0=12GB", "cpu=32GB"], "encoders-on-cpu")
    where = plan.device_map
    assert where["model.vision_model"] == where["model.audio_model"] == "cpu"
    assert where["model.mm_projector"] == where["model.audio_projector"] == 0
    assert where["model.language_model.model.embed_tokens"] == where["model.language_model.lm_head"] == 0
    layers = list(_layer_devices(plan).values())
    split = layers.index("cpu")
    assert split > 0 and layers == ["cuda:0"] * split + ["cpu"] * (36 - split)
    assert plan.used("cuda:0") + plan.reserve["cuda:0"] <= 12 * 10**9
    assert "layers 0-" in plan.table() and "vision_model" in plan.table()


def test_quantised_llm_needs_less_room():
    bf16 = plan_device_map(preset_config("hcx-omni-8b"), {"cuda:0": "10GB", "disk": "100GB"})
    nf4 = plan_device_map(preset_config("hcx-omni-8b"), {"cuda:0": "10GB", "disk": "100GB"}, quant="nf4")
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


def test_dispatch_from_sharded_safetensors_with_disk_offload_reproduces_the_logits(tmp_path):
    model = build_preset("tiny-hcx-omni").eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="10MB")
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) > 1
    units = placement_units(model, torch.float32)
    # Room on the CPU for everything but the LLM's head: the head (and what follows) goes to disk.
    cpu = sum(u.nbytes for u in units) - units[-1].nbytes
    plan = plan_device_map(model, {"cpu": cpu, "disk": "1GB"}, dtype=torch.float32)
    assert plan.device_map["model.language_model.lm_head"] == "disk"
    loaded = dispatch_checkpoint(tmp_path / "ckpt", plan, offload_folder=tmp_path / "offload")
    assert any((tmp_path / "offload").glob("*.dat"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="offload_folder"):
        dispatch_checkpoint(tmp_path / "ckpt", plan)


def test_plan_cli_prints_the_table_and_rejects_bad_budgets(capsys):
    assert main(["plan", "hcx-omni-8b", "--budget", "cuda:0=16GB", "--budget", "cpu=64GB", "--policy",
                 "encoders-on-cpu"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0" in out and "model.language_model.model.layers.0: 0" in out
    assert main(["plan", "hcx-omni-8b", "--budget", "tpu=16GB"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
