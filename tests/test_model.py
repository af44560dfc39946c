import re

import torch
import torch.nn.functional as F

from hcx_extend.config import IGNORE_INDEX

HCX_PREFIXES = {"model.language_model.model.", "model.language_model.lm_head.", "model.vision_model.",
                "model.mm_projector.", "model.audio_model.", "model.audio_projector.", "model.sensor_model.",
                "model.sensor_projector."}


def test_state_dict_uses_exactly_the_hcx_prefixes(tiny_model):
    keys = tiny_model.state_dict().keys()
    prefixes = {next((p for p in HCX_PREFIXES if k.startswith(p)), k) for k in keys}
    assert prefixes == HCX_PREFIXES
    assert any(re.fullmatch(r"model\.language_model\.model\.layers\.1\.self_attn\.q_proj\.weight", k) for k in keys)
    assert "model.vision_model.blocks.0.attn.qkv.weight" in keys
    assert "model.audio_model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.sensor_model.layers.0.self_attn.q_proj.weight" in keys


def _reference_embeddings(model, batch):
    """Splice by hand: walk the placeholder positions row by row and copy item embeddings one by one."""
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids).clone()
    for name, modality_batch in batch["modality_inputs"].items():
        token_id = model.config.modality(name).token_id
        rows = iter(torch.cat(model.encode_modality(name, modality_batch)))
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if ids[b, t] == token_id:
                    embeds[b, t] = next(rows)
        assert next(rows, None) is None, f"{name}: embeddings left over"
    return embeds


@torch.no_grad()
def test_mixed_batch_equals_hand_built_reference_splice(tiny_model, mixed_batch):
    placeholder_counts = {name: int((mixed_batch["input_ids"] == tiny_model.config.modality(name).token_id).sum())
                          for name in ("image", "audio", "sensor")}
    # image 56x56 -> 4 tokens, 28x84 -> 3; audio 50 frames -> 25 after the conv -> 12; sensor 20 + 7 + 33 steps at stride 1.
    assert placeholder_counts == {"image": 7, "audio": 12, "sensor": 60}
    logits = tiny_model(**mixed_batch).logits
    reference = tiny_model.language_model(
        inputs_embeds=_reference_embeddings(tiny_model, mixed_batch), attention_mask=mixed_batch["attention_mask"]
    ).logits
    assert torch.equal(logits, reference)


@torch.no_grad()
def test_sensor_embeddings_come_from_encoder_then_projector(tiny_model, processor):
    recording = torch.randn(12, 6)
    batch = processor("x <sensor>", {"sensor": [recording]})["modality_inputs"]["sensor"]
    (features,) = tiny_model.encode_modality("sensor", batch)
    encoded, _ = tiny_model.model.sensor_model(recording[None], torch.tensor([12]))
    assert torch.allclose(features, tiny_model.model.sensor_projector(encoded[0]), atol=0)


@torch.no_grad()
def test_a_sample_gives_the_same_logits_alone_and_padded_in_a_batch(tiny_model, processor):
    torch.manual_seed(3)
    short = [{"role": "user", "content": "<sensor> hi"}]
    long = [{"role": "user", "content": "<image> <sensor> a longer question"}]
    rec_short, rec_long, image = torch.randn(9, 6), torch.randn(40, 6), torch.rand(3, 56, 56)
    alone = processor([short], {"sensor": [rec_short]}, padding_side="right")
    together = processor([short, long], {"sensor": [rec_short, rec_long], "image": [image]}, padding_side="right")
    n = alone["input_ids"].shape[1]
    assert torch.equal(together["input_ids"][0, :n], alone["input_ids"][0])
    logits_alone = tiny_model(**alone).logits[0]
    logits_batched = tiny_model(**together).logits[0, :n]
    assert torch.allclose(logits_alone, logits_batched, atol=1e-5)


def test_labels_at_placeholder_positions_are_ignored(tiny_model, processor):
    chat = [{"role": "user", "content": "<sensor> what?"}, {"role": "assistant", "content": "walking"}]
    batch = processor([chat], {"sensor": [torch.randn(10, 6)]}, return_labels=True, padding_side="right")
    labels = batch["labels"]
    answer = labels[labels != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer).startswith("walking<|im_end|>")
    # Labelling the placeholders too must not change the loss: they are ignored regardless.
    placeholders = batch["input_ids"] == tiny_model.config.modality("sensor").token_id
    poisoned = labels.clone()
    poisoned[placeholders] = batch["input_ids"][placeholders]
    with torch.no_grad():
        out = tiny_model(**{**batch, "labels": poisoned})
        logits = out.logits[0, :-1]
        expected = F.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss, expected, atol=1e-6)


@torch.no_grad()
def test_loss_on_label_positions_only_equals_full_loss(tiny_model, processor):
    chats = [[{"role": "user", "content": "<sensor> q"}, {"role": "assistant", "content": "running"}],
             [{"role": "user", "content": "longer <sensor> question"}, {"role": "assistant", "content": "no"}]]
    batch = processor(chats, {"sensor": [torch.randn(10, 6), torch.randn(4, 6)]}, return_labels=True,
                      padding_side="right")
    full = tiny_model(**batch)
    cheap = tiny_model(**batch, logits_to_keep="labels")
    assert cheap.logits.shape[0] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(full.loss, cheap.loss, atol=1e-6)


@torch.no_grad()
def test_generate_with_kv_cache_equals_generation_without_cache(tiny_model, mixed_batch):
    with_cache = tiny_model.generate(**mixed_batch, max_new_tokens=6, do_sample=False, use_cache=True)
    without_cache = tiny_model.generate(**mixed_batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, mixed_batch["input_ids"].shape[1] + 6)
    assert torch.equal(with_cache, without_cache)
    # And it is greedy decoding of the spliced prompt: the first new token is the argmax of the last logits.
    first = tiny_model(**mixed_batch).logits[:, -1].argmax(-1)
    assert torch.equal(with_cache[:, mixed_batch["input_ids"].shape[1]], first)


def test_adding_a_modality_builds_only_its_modules(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.add_modality({"name": "ecg", "encoder": {"model_type": "imu", "in_channels": 1, "hidden_size": 16,
                                                       "num_heads": 2, "output_size": 16}, "token_id": 128090})
    after = tiny_model.state_dict()
    new_keys = set(after) - set(before)
    assert new_keys and all(k.startswith(("model.ecg_model.", "model.ecg_projector.")) for k in new_keys)
    assert all(torch.equal(before[k], after[k]) for k in before)
