"""A decoder-only causal LM end to end: patch, one-shot linearization, path length and core map, fold, greedy
generation (gated = folded), save and load (loaded = gated). Also runs the README's example."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

import hf_linearize as hl

README = Path(__file__).resolve().parents[1] / "README.md"


def _model(kind: str) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    else:
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                               bos_token_id=1, eos_token_id=2)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _generate(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                          pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_lm_end_to_end(kind, tmp_path):
    model = hl.patch_model(_model(kind))
    ids = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2]} for i in range(0, 8, 2)]
    hl.one_shot(model, batches, nonlinear_fraction=0.5, progress=False)
    summary = hl.summary(model)["total"]
    assert summary["nonlinear"] == summary["units"] // 2

    report = hl.path_length_report(model)
    assert 0 < report["normalized_apl"] < report["depth"]["normalized"] == 1.0  # 2 layers, FFN branches 1/2
    assert hl.plot_core_map(report, tmp_path / "core_map.png").stat().st_size > 0

    folded = hl.fold(model)
    fold = hl.fold_report(folded)
    assert fold["total"]["params_after"] < fold["total"]["params_before"]
    assert all(site["form"] != "unchanged" for site in fold["sites"].values())
    prompt = ids[:1, :4]
    tokens = _generate(model, prompt)
    assert tokens.shape[1] > prompt.shape[1]
    assert torch.equal(_generate(folded, prompt), tokens)

    hl.save_pretrained(folded, tmp_path / "folded")
    assert torch.equal(_generate(hl.from_pretrained(tmp_path / "folded"), prompt), tokens)
    hl.save_pretrained(model, tmp_path / "gated")
    assert torch.equal(_generate(hl.from_pretrained(tmp_path / "gated"), prompt), tokens)
