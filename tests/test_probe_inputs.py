"""Default probe inputs per modality (text, image, dual encoder, audio) and the data-free input spec."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import timm
import torch
import transformers as tf
from torch import nn

from hf_linearize.probe_inputs import default_example_inputs, input_spec, inputs_from_spec

_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16)
_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
_WHISPER = dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, num_mel_bins=8,
                max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                decoder_start_token_id=1)
_WAV2VEC2 = dict(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=4,
                 num_conv_pos_embedding_groups=2)

MODELS: dict[str, Callable[[], nn.Module]] = {
    "clip": lambda: tf.CLIPModel(tf.CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=8)),
    "siglip": lambda: tf.SiglipModel(tf.SiglipConfig(text_config=_TEXT, vision_config=_VISION)),
    "clip_text": lambda: tf.CLIPTextModel(tf.CLIPTextConfig(**_TEXT)),
    "clip_vision": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**_VISION)),
    "whisper": lambda: tf.WhisperModel(tf.WhisperConfig(**_WHISPER)),
    "whisper_generation": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(**_WHISPER)),
    "speech2text": lambda: tf.Speech2TextModel(tf.Speech2TextConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, input_feat_per_channel=8,
        conv_channels=16, max_source_positions=32, max_target_positions=16)),
    "wav2vec2": lambda: tf.Wav2Vec2Model(tf.Wav2Vec2Config(**_WAV2VEC2)),
    "audio_spectrogram_transformer": lambda: tf.ASTModel(tf.ASTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, max_length=32,
        num_mel_bins=16, patch_size=8, frequency_stride=8, time_stride=8)),
    "bert": lambda: tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=24)),
    "timm_resnet": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
}
"""Tiny randomly initialised models, one per modality the default probe input covers."""

EXPECTED_KEYS = {
    "clip": {"input_ids", "attention_mask", "pixel_values"},
    "siglip": {"input_ids", "attention_mask", "pixel_values"},
    "clip_text": {"input_ids", "attention_mask"},
    "clip_vision": {"pixel_values"},
    "whisper": {"input_features", "decoder_input_ids"},
    "whisper_generation": {"input_features", "decoder_input_ids"},
    "speech2text": {"input_features", "decoder_input_ids"},
    "wav2vec2": {"input_values"},
    "audio_spectrogram_transformer": {"input_values"},
    "bert": {"input_ids", "attention_mask"},
}


def _run(model: nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_inputs_run_through_the_model(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    inputs = default_example_inputs(model)
    if name.startswith("timm"):
        assert isinstance(inputs, torch.Tensor) and inputs.shape == (1, 3, 224, 224)
    else:
        assert set(inputs) == EXPECTED_KEYS[name]
        for key, value in inputs.items():
            assert value.shape[0] == 1
            assert value.dtype == (torch.int64 if key.endswith(("_ids", "_mask")) else torch.float32), key
        ids = [inputs[k] for k in ("input_ids", "decoder_input_ids") if k in inputs]
        assert all(0 <= int(i.min()) and int(i.max()) < 64 for i in ids)
    _run(model, inputs)


def test_shapes_follow_the_config() -> None:
    whisper = default_example_inputs(MODELS["whisper"]())
    assert whisper["input_features"].shape == (1, 8, 32)  # num_mel_bins, 2 * max_source_positions
    clip = default_example_inputs(MODELS["clip"]())
    assert clip["pixel_values"].shape == (1, 3, 32, 32)  # from vision_config
    # Two conv layers (kernel 10/3, stride 5/2) make mask_time_length = 10 frames: (10 - 1) * 2 + 3 = 21 -> 110.
    wav2vec2 = MODELS["wav2vec2"]()
    samples = default_example_inputs(wav2vec2)["input_values"].shape
    assert samples == (1, 110)
    frames = wav2vec2._get_feat_extract_output_lengths(torch.tensor(samples[1]))
    assert int(frames) == 10


def test_wav2vec2_probe_also_runs_in_train_mode() -> None:
    """SpecAugment masks ``mask_time_length`` frames in train mode: the waveform is long enough for that."""
    model = tf.Wav2Vec2Model(tf.Wav2Vec2Config(**_WAV2VEC2, mask_time_prob=0.5)).train()
    _run(model, default_example_inputs(model))


def test_existing_text_and_pixel_inputs_are_unchanged() -> None:
    bert = default_example_inputs(MODELS["bert"]())
    assert bert["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2]]
    assert bert["attention_mask"].tolist() == [[1] * 6]
    t5 = tf.T5Model(tf.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2))
    assert default_example_inputs(t5)["decoder_input_ids"].tolist() == [[5, 6, 7, 8]]
    pixels = default_example_inputs(MODELS["clip_vision"]())["pixel_values"]
    assert torch.equal(pixels, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def test_token_ids_stay_inside_a_tiny_vocabulary() -> None:
    model = tf.BertModel(tf.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=24)).eval()
    inputs = default_example_inputs(model)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 0, 1, 2]]
    _run(model, inputs)


def test_vision_language_generator_keeps_a_text_only_probe() -> None:
    """LLaVA takes ``pixel_values`` too, but images need image tokens in the ids: it is no dual encoder."""
    config = tf.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(model_type="clip_vision_model", **_VISION), image_token_index=60)
    model = tf.LlavaForConditionalGeneration(config).eval()
    inputs = default_example_inputs(model)
    assert set(inputs) == {"input_ids", "attention_mask"}
    _run(model, inputs)


def test_unknown_model_asks_for_example_inputs() -> None:
    with pytest.raises(ValueError, match=r"Cannot build an example input for Linear.*pass example_inputs="):
        default_example_inputs(nn.Linear(4, 2))


# --------------------------------------------------------------------------------------------- input specs
def _same_structure(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
    elif isinstance(a, (tuple, dict)):
        assert len(a) == len(b)
        pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
        if isinstance(a, dict):
            assert list(a) == list(b)
        for x, y in pairs:
            _same_structure(x, y)
    else:
        assert a == b


def test_spec_of_a_tensor() -> None:
    x = torch.randn(2, 3, 8, 8)
    spec = input_spec(x)
    assert spec == {"kind": "tensor", "shape": [2, 3, 8, 8], "dtype": "float32"}
    rebuilt = inputs_from_spec(spec)
    _same_structure(rebuilt, x)
    assert torch.equal(rebuilt, inputs_from_spec(spec))  # seeded
    assert not torch.equal(rebuilt, inputs_from_spec(spec, seed=1))


def test_spec_of_a_tuple() -> None:
    x = (torch.randn(1, 4, dtype=torch.float16), torch.tensor([3, 4]), torch.tensor([True, False]), None, 2, "mean")
    spec = input_spec(x)
    assert spec["kind"] == "tuple"
    assert [item["kind"] for item in spec["items"]] == ["tensor"] * 3 + ["value"] * 3
    assert [item.get("dtype") for item in spec["items"][:3]] == ["float16", "int64", "bool"]
    rebuilt = inputs_from_spec(spec)
    _same_structure(rebuilt, x)
    assert rebuilt[1].tolist() == [0, 0] and rebuilt[2].tolist() == [True, True]


def test_spec_of_a_dict_with_a_mask() -> None:
    x = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 0]]),
         "pixel_values": torch.randn(1, 3, 4, 4, dtype=torch.bfloat16), "use_cache": False, "scale": 0.5}
    rebuilt = inputs_from_spec(input_spec(x))
    _same_structure(rebuilt, x)
    assert rebuilt["input_ids"].tolist() == [[0, 0, 0]]
    assert rebuilt["attention_mask"].tolist() == [[1, 1, 1]]


def test_spec_survives_json() -> None:
    x = {"input_values": torch.randn(1, 110), "attention_mask": torch.ones(1, 110, dtype=torch.int32),
         "flag": True, "note": None}
    spec = input_spec(x)
    rebuilt = inputs_from_spec(json.loads(json.dumps(spec)))
    _same_structure(rebuilt, x)
    assert torch.equal(rebuilt["input_values"], inputs_from_spec(spec)["input_values"])
    for inputs in (torch.zeros(2, dtype=torch.uint8), (torch.randn(3), 1.5)):
        _same_structure(inputs_from_spec(json.loads(json.dumps(input_spec(inputs)))), inputs)


def test_spec_of_default_inputs_rebuilds_inputs_the_model_takes() -> None:
    model = MODELS["whisper"]().eval()
    spec = json.loads(json.dumps(input_spec(default_example_inputs(model))))
    _run(model, inputs_from_spec(spec))


@pytest.mark.parametrize("inputs, where", [
    ({"pixel_values": [torch.randn(1, 3)]}, r"inputs\['pixel_values'\] of type list"),
    ((torch.randn(1), object()), r"inputs\[1\] of type object"),
    ([torch.randn(1)], "inputs of type list"),
    ({1: torch.randn(1)}, "input key 1"),
])
def test_spec_refuses_what_it_cannot_describe(inputs: Any, where: str) -> None:
    with pytest.raises(TypeError, match=where):
        input_spec(inputs)


def test_malformed_spec_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="Not an input spec"):
        inputs_from_spec({"kind": "list", "items": []})
    with pytest.raises(ValueError, match=r"spec\['items'\]\['x'\]"):
        inputs_from_spec({"kind": "dict", "items": {"x": {"kind": "tensor", "shape": [2], "dtype": "floaty"}}})


def _llama() -> nn.Module:
    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def test_the_recorded_probe_feeds_tokens_not_padding():
    """Zeros are LLaMA's padding token here: the recorded probe rebuilt as zeros gave all-zero logits, so fold's
    output check compared zeros with zeros. The rebuilt probe holds real tokens, modulo the vocabulary."""
    import hf_linearize as hl
    from hf_linearize.patching import patch_state
    from hf_linearize.probe_inputs import recorded_probe

    model = hl.patch_model(_llama(), example_inputs={"input_ids": torch.zeros(2, 9, dtype=torch.long)})
    probe = recorded_probe(model, patch_state(model).probe)
    assert probe["input_ids"].shape == (2, 9) and probe["input_ids"].dtype == torch.long
    assert probe["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 2, 5, 6, 7]
    with torch.no_grad():
        assert model(**probe).logits.abs().amax() > 0


def test_a_wrong_fold_on_the_recorded_probe_is_caught(monkeypatch):
    import hf_linearize as hl
    from hf_linearize import folding

    model = hl.patch_model(_llama())
    hl.set_linear(model, 0.5)
    real = folding._linear_response

    def wrong(gate, units):
        slope, offset = real(gate, units)
        return slope * 0, offset

    monkeypatch.setattr(folding, "_linear_response", wrong)
    with pytest.raises(RuntimeError, match="fold changed the model's output"):
        hl.fold(model)  # no example_inputs: the recorded probe is the check


def test_the_recorded_probe_follows_a_cast_of_the_model(tmp_path):
    """A timm model cast to bf16 after patching: the probe's pixels follow it, so saving (its path-graph trace)
    and folding work without example_inputs."""
    import hf_linearize as hl

    model = hl.patch_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                             num_classes=3)).eval()
    hl.set_linear(model, 0.5)
    model.to(torch.bfloat16)
    hl.save_pretrained(model, tmp_path)
    folded = hl.fold(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert folded(x).dtype == torch.bfloat16
    loaded = hl.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
