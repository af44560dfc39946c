import torch

from hcx_extend import OmniProcessor, align_tokens
from hcx_extend.config import IGNORE_INDEX


def test_markers_expand_to_one_placeholder_per_embedding(tiny_model, processor):
    batch = processor("a <sensor> b <image> c", {"sensor": [torch.randn(11, 6)], "image": [torch.rand(3, 28, 56)]},
                      use_chat_template=False)
    ids = batch["input_ids"][0].tolist()
    sensor_id, image_id = tiny_model.config.modality("sensor").token_id, tiny_model.config.modality("image").token_id
    assert ids.count(sensor_id) == 11 and ids.count(image_id) == 2  # 28x56 -> 2x4 patches -> 2 merged tokens
    # Text pieces are tokenized as they are, placeholders sit exactly where the markers were.
    text = processor.tokenizer.decode([i for i in ids if i not in (sensor_id, image_id)])
    assert text == "a  b  c"
    first = ids.index(sensor_id)
    assert ids[first:first + 11] == [sensor_id] * 11


def test_left_and_right_padding(processor):
    batch = processor(["<sensor>", "longer text <sensor>"], {"sensor": [torch.randn(3, 6), torch.randn(3, 6)]},
                      use_chat_template=False, padding_side="left")
    mask = batch["attention_mask"]
    assert mask[0].tolist()[: mask.shape[1] - int(mask[0].sum())] == [0] * (mask.shape[1] - int(mask[0].sum()))
    assert int(mask[1].sum()) == mask.shape[1]
    right = processor(["<sensor>", "longer text <sensor>"], {"sensor": [torch.randn(3, 6), torch.randn(3, 6)]},
                      use_chat_template=False, padding_side="right")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0


def test_labels_cover_only_the_assistant_answer(processor):
    chat = [{"role": "user", "content": "<sensor> What activity?"}, {"role": "assistant", "content": "running"}]
    batch = processor([chat], {"sensor": [torch.randn(5, 6)]}, return_labels=True)
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    labelled = labels != IGNORE_INDEX
    assert processor.tokenizer.decode(ids[labelled]) == "running<|im_end|>\n"
    assert torch.equal(labels[labelled], ids[labelled])


def test_normalization_from_the_config_is_applied(tiny_model, tokenizer):
    tiny_model.config.modality("sensor").normalization = {"mean": [1.0] * 6, "std": [2.0] * 6}
    processor = OmniProcessor(tokenizer, tiny_model.config)
    values = processor("<sensor>", {"sensor": [torch.full((4, 6), 5.0)]})["modality_inputs"]["sensor"]["values"]
    assert torch.equal(values, torch.full((1, 4, 6), 2.0))


def test_missing_placeholder_token_is_added_and_embeddings_grow(tokenizer):
    from hcx_extend import build_preset

    model = build_preset("tiny-hcx-omni")
    model.add_modality({"name": "ecg", "encoder": {"model_type": "imu", "in_channels": 1, "hidden_size": 16,
                                                  "num_heads": 2, "output_size": 16}})
    assert model.config.modality("ecg").token_id is None
    before = model.get_input_embeddings().weight.detach().clone()
    added = align_tokens(model, tokenizer)
    assert added == ["<|ECG_PAD|>"]
    assert model.config.modality("ecg").token_id == tokenizer.convert_tokens_to_ids("<|ECG_PAD|>") == 259
    # The tiny vocabulary (128,256 rows) already has room: no resize, rows unchanged.
    assert torch.equal(model.get_input_embeddings().weight, before)
