"""fold: exact, smaller, an ordinary model (generate / export / compile), and clear errors."""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import os
import sys

import huggingface_hub
import pytest
import timm
import torch
import transformers as tf
from conftest import FAMILY_CASES, MULTI30K, run, run_subprocess
from torch import nn

import hf_linearize as hl
from hf_linearize.folding import FoldedGluFFN, FoldedInput
from hf_linearize.translation.tokenizer import train_shared_tokenizer

CNN_CASES = {"timm_resnet", "timm_efficientnet", "timm_mobilenetv3", "torchvision_resnet"}
FFN_CASES = sorted(set(FAMILY_CASES) - CNN_CASES)


def _patched(case: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model, inputs = FAMILY_CASES[case]()
    model.eval()
    for name, param in model.named_parameters():
        if name.endswith("gamma"):  # ConvNeXt layer scale starts at 1e-6, which would hide any MLP error
            param.data.fill_(1.0)
    return hl.patch_model(model, example_inputs=inputs), inputs


@functools.lru_cache(maxsize=None)
def _shared_patched(case: str) -> tuple[nn.Module, object]:
    """One patched model per family for the grid below (fold never changes its input; gates are reset per test)."""
    return _patched(case)


def _set_gates(model: nn.Module, fraction: float, structured: bool, seed: int = 0) -> None:
    """``fraction`` of the units linear: random units per layer, or whole layers (the first round(f*S) sites).
    A few remaining units get gates strictly between 0 and 1 (they stay nonlinear and keep their values)."""
    gates = list(hl.gated_modules(model))
    for _, gate in gates:
        gate.alpha.data.zero_()
    if structured:
        whole = round(fraction * len(gates))
        hl.set_linear(model, {name: float(i < whole) for i, (name, _) in enumerate(gates)})
    else:
        hl.set_linear(model, fraction, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for _, gate in gates:
        partial = (gate.alpha == 0) & (torch.rand(gate.channels, generator=generator) < 0.2)
        gate.alpha.data[partial] = torch.rand(int(partial.sum()), generator=generator) * 0.9 + 0.05


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _close(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("case", FFN_CASES)
@pytest.mark.parametrize("fraction,structured", [(0.0, False), (0.5, False), (0.9, False), (1.0, False),
                                                 (0.5, True), (0.9, True)])
def test_fold_is_exact_and_smaller(case, fraction, structured):
    model, inputs = _shared_patched(case)
    _set_gates(model, fraction, structured)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = hl.fold(model, verify=False)
    with torch.no_grad():
        expected, got = run(model, inputs), run(folded, inputs)
    assert _close(expected, got) <= 1e-5
    assert _params(folded) <= _params(model)
    report = hl.fold_report(folded)
    assert report["total"]["params_after"] == _params(folded) and report["total"]["params_before"] == _params(model)
    linear = hl.summary(model)["layers"]
    for name, site in report["sites"].items():
        assert site["linear"] == linear[name]["linear"]
        forms = ({"unchanged"} if site["linear"] == 0 else {"affine"} if site["linear"] == site["units"]
                 else {"dense", "factorised"})
        assert site["form"] in forms
        assert site["macs_after"] <= site["macs_before"] and site["params_after"] <= site["params_before"]
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()
    assert len(list(hl.gated_modules(model))) == len(linear)


def _ids() -> torch.Tensor:
    return torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))


EXTRA_CASES = {  # families with fold rules that FAMILY_CASES does not build
    "distilbert": lambda: (tf.DistilBertModel(tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2,
                                                                  hidden_dim=24)), {"input_ids": _ids()}),
    "hf_vit": lambda: (tf.ViTModel(tf.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=24, image_size=32, patch_size=8)),
                       {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}),
    "timm_convnext_conv_mlp": lambda: (timm.create_model("convnext_atto", pretrained=False, num_classes=5,
                                                         conv_mlp=True),  # 1x1-conv MLP, channels first
                                       torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))),
    "llama": lambda: (tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         num_key_value_heads=2)), {"input_ids": _ids()}),
}


@pytest.mark.parametrize("case", sorted(EXTRA_CASES))
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_fold_more_families(case, fraction):
    torch.manual_seed(0)
    model, inputs = EXTRA_CASES[case]()
    for name, param in model.named_parameters():
        if name.endswith("gamma"):
            param.data.fill_(1.0)
    hl.patch_model(model.eval(), example_inputs=inputs)
    _set_gates(model, fraction, structured=False)
    folded = hl.fold(model, example_inputs=inputs)
    assert {s["form"] for s in hl.fold_report(folded)["sites"].values()} == {"dense" if fraction < 1 else "affine"}
    with torch.no_grad():
        assert _close(run(model, inputs), run(folded, inputs)) <= 1e-5


@pytest.mark.parametrize("case", sorted(CNN_CASES))
def test_fold_cnn_sites_stay_gated(case):
    model, inputs = _patched(case)
    _set_gates(model, 0.9, structured=False)
    folded = hl.fold(model, verify=False)
    with torch.no_grad():
        assert _close(run(model, inputs), run(folded, inputs)) == 0.0
    report = hl.fold_report(folded)
    assert {s["form"] for s in report["sites"].values()} == {"gated"}
    assert all("CNN activations stay gated" in s["note"] for s in report["sites"].values())
    assert report["total"]["params_after"] == report["total"]["params_before"]


def test_forms_follow_the_mac_crossover():
    """Marian fixture: d = 16, encoder FFN 24, decoder FFN 20; dense M beats the factorised pair once
    |L| (16 + 16) > 16 * 16, i.e. |L| > 8."""
    model, _ = _patched("marian")
    gates = dict(hl.gated_modules(model))
    names = list(gates)
    for count, name in zip((8, 9, 0, 20), names):
        mask = torch.zeros(gates[name].channels, dtype=torch.bool)
        mask[:count] = True
        hl.set_linear(model, {name: mask})
    sites = hl.fold_report(hl.fold(model))["sites"]
    assert [sites[n]["form"] for n in names] == ["factorised", "dense", "unchanged", "affine"]
    enc0, enc1, dec0, dec1 = (sites[n] for n in names)
    assert enc0["macs_before"] == 2 * 16 * 24 and enc0["macs_after"] == 2 * 16 * 24  # units only reordered
    assert enc1["macs_after"] == 16 * 15 + (15 + 16) * 16                            # W1[N], [W2[:, N], M]
    assert dec1["macs_after"] == 16 * 16                                             # one affine map


def test_structure_and_kept_gate_values():
    model, inputs = _patched("marian")
    _set_gates(model, 0.6, structured=False, seed=3)
    alphas = {name: gate.alpha.detach().clone() for name, gate in hl.gated_modules(model)}
    folded = hl.fold(model)
    layer = folded.model.encoder.layers[0]
    assert isinstance(layer.fc1, FoldedInput) and isinstance(layer.activation_fn, nn.Identity)
    assert isinstance(layer.fc2, nn.Linear) and type(folded) is type(model)
    kept = dict(hl.gated_modules(folded))
    for name, alpha in alphas.items():
        site = kept[name.replace("activation_fn", "fc1.act")]
        nonlinear = alpha[alpha < 1 - 1e-3]
        assert torch.equal(site.alpha.detach(), nonlinear)  # units with 0 < a < 1 keep their gate values


def test_zero_gates_fold_to_the_bare_activation():
    model, inputs = _patched("t5_v1_1")
    folded = hl.fold(model)
    assert not list(hl.gated_modules(folded))
    ffn = folded.encoder.block[0].layer[-1].DenseReluDense
    assert type(ffn).__name__ == "T5DenseGatedActDense" and not isinstance(ffn.act, hl.GatedActivation)
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(folded, inputs))


def test_glu_sites_become_folded_modules():
    model, inputs = _patched("timm_swiglu_vit")
    hl.set_linear(model, 0.75)
    folded = hl.fold(model)
    assert isinstance(folded.blocks[0].mlp, FoldedGluFFN)
    hl.set_linear(model, 1.0)
    assert isinstance(hl.fold(model).blocks[0].mlp, nn.Linear)  # a fully linear gated FFN is one affine map


def test_report_counts_flops():
    model, _ = _patched("marian")
    hl.set_linear(model, 0.9)
    report = hl.fold_report(hl.fold(model))
    total = report["total"]
    assert 0 < total["flops_after"] < total["flops_before"]
    assert total["ffn_macs_after"] < total["ffn_macs_before"]
    assert "dense" in str(report) and "params" in str(report)


def test_verify_catches_a_wrong_fold(monkeypatch):
    model, _ = _patched("marian")
    hl.set_linear(model, 0.5)
    monkeypatch.setattr("hf_linearize.folding._linear_response",
                        lambda gate, units: (torch.full((units.numel(),), 2.0, dtype=torch.float64),
                                             torch.zeros(units.numel(), dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="fold changed the model's output"):
        hl.fold(model)


def test_bad_inputs(marian):
    model, inputs = marian
    with pytest.raises(ValueError, match="not patched"):
        hl.fold(model)
    assert not hl.is_patched(model)
    hl.patch_model(model)
    hl.set_linear(model, 0.5)
    folded = hl.fold(model)
    state = {k: v.clone() for k, v in folded.state_dict().items()}
    with pytest.raises(ValueError, match="already folded"):
        hl.fold(folded)
    for refuses in (hl.summary, hl.patch_model, hl.average_path_length):  # its sites no longer hold their units
        with pytest.raises(ValueError, match="folded model"):
            refuses(folded)
    assert all(torch.equal(state[k], v) for k, v in folded.state_dict().items())
    with pytest.raises(ValueError, match="not folded"):
        hl.fold_report(model)


# --------------------------------------------------------------------------------------------- a trained Marian
def _multi30k(split: str, lang: str, lines: int) -> list[str]:
    with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as fh:
        return [line.strip() for line in itertools.islice(fh, lines)]


@pytest.fixture(scope="module")
def trained_marian() -> tuple[nn.Module, tf.PreTrainedTokenizerFast, list[str]]:
    """A tiny Marian (d=32, 2+2 layers, FFN 64/48) trained for 150 Adam steps (batch 32) on the first 400 Multi30k
    en->de pairs with a 500-piece BPE vocabulary: enough for its greedy outputs to depend on the source sentence
    (20-60 s on 2 CPU cores, hence slow). Trained here rather than stored, so the test needs no binary fixture."""
    torch.manual_seed(0)
    source, target = _multi30k("train", "en", 400), _multi30k("train", "de", 400)
    tokenizer = train_shared_tokenizer(source + target, vocab_size=500, model="bpe")
    config = tf.MarianConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                             decoder_ffn_dim=48, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0, dropout=0.0)
    model = tf.MarianMTModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for step in range(150):
        batch = slice((step * 32) % 400, (step * 32) % 400 + 32)
        enc = tokenizer(source[batch], text_target=target[batch], padding=True, truncation=True, max_length=24,
                        return_tensors="pt")
        enc["labels"][enc["labels"] == tokenizer.pad_token_id] = -100
        loss = model(**enc).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, _multi30k("val", "en", 8)


@pytest.mark.slow
def test_trained_marian_generates_the_same_tokens(trained_marian):
    model, tokenizer, sentences = trained_marian
    model = hl.patch_model(model)
    _set_gates(model, 0.5, structured=False, seed=1)
    folded = hl.fold(model)
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc, decoder_input_ids=enc["input_ids"][:, :6]).logits
        got = folded(**enc, decoder_input_ids=enc["input_ids"][:, :6]).logits
        assert _close(expected, got) <= 1e-5  # real inputs
        gated_tokens = model.generate(**enc, max_new_tokens=20, do_sample=False, num_beams=1)
        folded_tokens = folded.generate(**enc, max_new_tokens=20, do_sample=False, num_beams=1)
    assert gated_tokens.shape[1] > 5 and len(set(tokenizer.batch_decode(gated_tokens))) > 1
    assert torch.equal(gated_tokens, folded_tokens)


def test_folded_marian_exports(marian):
    model, inputs = marian
    hl.set_linear(hl.patch_model(model), 0.7)
    folded = hl.fold(model)
    kwargs = dict(inputs, use_cache=False)
    program = torch.export.export(folded, args=(), kwargs=kwargs)
    with torch.no_grad():
        assert torch.allclose(program.module()(**kwargs).logits, folded(**kwargs).logits, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_folded_marian_compiles(marian):
    model, inputs = marian
    hl.set_linear(hl.patch_model(model), 0.7)
    folded = hl.fold(model)
    compiled = torch.compile(folded)
    with torch.no_grad():
        assert torch.allclose(compiled(**inputs).logits, folded(**inputs).logits, atol=1e-5, rtol=0)


def _set_affine_targets(model: nn.Module, seed: int = 5) -> None:
    """Random linear targets: ``p x + q`` per elementwise unit, a constant ``q`` per GLU unit."""
    generator = torch.Generator().manual_seed(seed)
    for _, gate in hl.gated_modules(model):
        offset = torch.rand(gate.channels, generator=generator) + 0.5 if gate.kind == "glu" else \
            torch.randn(gate.channels, generator=generator) * 0.3
        slope = None if gate.kind == "glu" else torch.rand(gate.channels, generator=generator) + 0.5
        gate.set_targets(slope=slope, offset=offset)


@pytest.mark.parametrize("case", ["t5", "t5_v1_1", "timm_swiglu_vit", "marian"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 1.0])
def test_affine_targets_fold_exactly(case, fraction):
    """A linear unit with target p x + q folds into W2[:, L] diag(p) W1[L] and W2[:, L] (p b1[L] + q); a GLU unit
    with constant target q into W2[:, L] diag(q) W_v[L]. T5 has no biases: the shift q must create one."""
    model, inputs = _shared_patched(case)
    _set_gates(model, fraction, structured=False, seed=4)
    _set_affine_targets(model)
    try:
        folded = hl.fold(model, example_inputs=inputs)
        with torch.no_grad():
            assert _close(run(model, inputs), run(folded, inputs)) <= 1e-5
        kept = [gate for _, gate in hl.gated_modules(folded)]
        assert bool(kept) == (fraction < 1)  # nonlinear units with gates above 0 keep their gates and targets
        assert all(gate._affine_targets() is not None for gate in kept)
    finally:
        for _, gate in hl.gated_modules(model):
            gate.set_targets(slope=torch.ones(gate.channels), offset=torch.full((gate.channels,), gate.default_offset))


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("case,affine", [("marian", False), ("t5_v1_1", False), ("timm_vit", False), ("t5", True)])
def test_folded_checkpoint_round_trip(case, affine, tmp_path):
    model, inputs = _patched(case)
    _set_gates(model, 0.6, structured=False, seed=2)
    if affine:
        _set_affine_targets(model)
    folded = hl.fold(model, example_inputs=inputs)
    hl.save_pretrained(folded, tmp_path)
    metadata = json.loads((tmp_path / "linearize_config.json").read_text())
    assert metadata["variant"] == "folded" and metadata["summary"] == dict(hl.summary(model))
    card = (tmp_path / "README.md").read_text()
    assert "This checkpoint is folded" in card and "folded" in card.split("---")[1]  # prose and tag
    loaded = hl.from_pretrained(tmp_path)
    assert type(loaded) is type(folded) and hl.fold_report(loaded)["sites"] == hl.fold_report(folded)["sites"]
    expected, got = folded.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(run(folded, inputs), run(loaded, inputs))


def test_folded_model_pushes_and_loads_from_the_hub(tmp_path):
    from hub_server import LocalHub, hub_env

    model, inputs = _patched("marian")
    hl.set_linear(model, 0.7)
    folded = hl.fold(model, example_inputs=inputs)
    with LocalHub(token="secret") as hub, hub_env(hub):
        hl.push_to_hub(folded, "user/marian-folded", save_directory=tmp_path / "local")
        loaded = hl.from_pretrained("user/marian-folded")
        card = huggingface_hub.ModelCard.load("user/marian-folded")
    assert hl.fold_report(loaded)["sites"] == hl.fold_report(folded)["sites"]
    assert "This checkpoint is folded" in card.text and 'hl.from_pretrained("user/marian-folded")' in card.text
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(folded, inputs))


def test_folded_weights_never_load_into_the_gated_architecture(tmp_path):
    model, _ = _patched("marian")
    hl.set_linear(model, 0.7)
    hl.save_pretrained(hl.fold(model), tmp_path)
    config_file = tmp_path / "linearize_config.json"
    metadata = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in metadata.items() if k != "variant"}))
    with pytest.raises(hl.LinearizedCheckpointError, match=r"do not fit(.|\n)*fc1\.proj\.weight"):
        hl.from_pretrained(tmp_path)
    config_file.write_text(json.dumps(dict(metadata, variant="pruned")))
    with pytest.raises(hl.LinearizedCheckpointError, match="variant 'pruned'"):
        hl.from_pretrained(tmp_path)


@pytest.mark.slow
def test_recipe_saves_the_folded_model_next_to_the_gated_one(tmp_path):
    root = MULTI30K.parents[1]
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = run_subprocess(
        [sys.executable, str(root / "recipes" / "translate_wmt.py"), "--config",
         str(root / "recipes" / "configs" / "synthetic.yaml"), "--output_dir", str(out), "--synthetic_train_size",
         "400", "--synthetic_eval_size", "16", "--max_steps", "8", "--prior_start", "0.25", "--prior_warmup", "0",
         "--prior_lambda", "50", "--warmup_steps", "0", "--gate_lr", "1.0", "--max_new_tokens", "16", "--fold", "true"],
        cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    folded_results = results["folded"]
    assert folded_results["identical_translations"] == 1.0 and folded_results["generate_speedup"] > 0
    assert folded_results["fold_report"]["params_after"] < folded_results["fold_report"]["params_before"]
    folded = hl.from_pretrained(out / "final_folded")
    gated = hl.from_pretrained(out / "final")
    assert hl.fold_report(folded)["total"]["generate_speedup"] == folded_results["generate_speedup"]
    assert "faster than with the gated model" in (out / "final_folded" / "README.md").read_text()
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    with torch.no_grad():
        expected = gated(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        assert _close(expected, folded(input_ids=ids, decoder_input_ids=ids[:, :3]).logits) <= 1e-5
