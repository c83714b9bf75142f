"""fold: projections found in the traced data flow, exact, smaller, an ordinary model (generate / export / compile),
and a reason in words wherever a site stays gated."""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import os
import sys
from typing import Any, Callable

import huggingface_hub
import pytest
import timm
import tiny_models
import torch
import transformers as tf
from conftest import FAMILY_CASES, MULTI30K, run, run_subprocess
from torch import nn

import hf_linearize as hl
from hf_linearize.folding import FoldedExperts, FoldedGluFFN, FoldedInput, _linear_response, fold_state, refold
from hf_linearize.patching import patch_state
from hf_linearize.translation.tokenizer import train_shared_tokenizer

GRID_CASES = ["bart", "fsmt", "m2m100", "mbart", "mt5", "pegasus", "t5"]
"""The families with their own site tables that ``FOLD_CASES`` does not hold (Marian, BERT, T5 v1.1 are there)."""


def _image(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _ids() -> torch.Tensor:
    return torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))


def _timm(name: str, size: int, **kwargs: Any) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (timm.create_model(name, pretrained=False, num_classes=5, **kwargs), _image(size))


FOLD_CASES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    **{name: build for name, build in tiny_models.ALL.items()  # not the CNN (below), nor LLaMA's layout again
       if name not in ("timm_regnet", "wav2vec2", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    **{name: FAMILY_CASES[name] for name in ("marian", "bert", "t5_v1_1")},
    "distilbert": lambda: (tf.DistilBertModel(tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2,
                                                                  hidden_dim=24)), {"input_ids": _ids()}),
    "hf_vit": lambda: (tf.ViTModel(tf.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=24, image_size=32, patch_size=8)),
                       {"pixel_values": _image(32)}),
    "timm_vit": _timm("vit_tiny_patch16_224", 32, img_size=32, depth=2, embed_dim=32, num_heads=2),
    "timm_swin": _timm("swin_tiny_patch4_window7_224", 32, img_size=32, window_size=2, depths=(1, 1, 1, 1),
                       embed_dim=16, num_heads=(1, 1, 1, 1)),
    "timm_swiglu_vit": _timm("vit_small_patch16_224", 32, img_size=32, depth=2, embed_dim=32, num_heads=2,
                             mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU),  # packed GLU, gate last
    "timm_eva": _timm("eva02_tiny_patch14_224", 28, img_size=28, depth=2),  # timm SwiGLU: separate projections
    "timm_convnext": _timm("convnext_atto", 32, dims=(8, 16, 24, 32)),  # Mlp of nn.Linear, channels last
    "timm_convnext_conv_mlp": _timm("convnext_atto", 32, dims=(8, 16, 24, 32),
                                    conv_mlp=True),  # ConvMlp: 1x1 convolutions, channels first
    "mlp": lambda: (nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 4)),
                    torch.randn(5, 8, generator=torch.Generator().manual_seed(4))),  # site 1's fc_out is site 2's fc_in
}
"""Every layout the README names as folding (``tiny_models.ALL``: GPT-2 ``Conv1D``, GPT-J, GPT-NeoX, OPT, Falcon,
BLOOM, Phi, Phi-3's packed GLU, LLaMA's separate GLU, Mixtral and Qwen2-MoE fused experts, Whisper, CLIP, HF
Swin/ConvNeXt/DINOv2, DeBERTa-v2, ALBERT's shared layer), plus families with their own site tables, small timm
models and a plain MLP stack."""


def _build(case: str) -> tuple[nn.Module, Any]:
    """Model ``case`` (``FOLD_CASES``, ``tiny_models.ALL`` or ``FAMILY_CASES``) in eval mode, patched on its inputs."""
    torch.manual_seed(0)
    model, inputs = {**FAMILY_CASES, **tiny_models.ALL, **FOLD_CASES}[case]()
    model.eval()
    for name, param in model.named_parameters():
        if name.endswith(("gamma", "layer_scale_parameter")):  # ConvNeXt layer scales start at 1e-6: they would
            param.data.fill_(1.0)                                # hide any MLP error
    return hl.patch_model(model, example_inputs=inputs), inputs


@functools.lru_cache(maxsize=None)
def _shared_patched(case: str) -> tuple[nn.Module, object]:
    """One patched model per case for the grids below (fold never changes its input; gates are reset per test)."""
    return _build(case)


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


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _assert_folded(model: nn.Module, folded: nn.Module, inputs: Any, forms: set[str]) -> None:
    """Every site in one of ``forms``; exact within 1e-5 of the output scale; never larger, per site and in all."""
    report = hl.fold_report(folded)
    assert {s["form"] for s in report["sites"].values()} <= forms, report
    with torch.no_grad():
        assert _close(run(model, inputs), run(folded, inputs)) <= 1e-5
    total = report["total"]
    assert total["params_after"] == _params(folded) <= _params(model) == total["params_before"]
    assert total["ffn_macs_after"] <= total["ffn_macs_before"]
    for site in report["sites"].values():
        assert site["macs_after"] <= site["macs_before"] and site["params_after"] <= site["params_before"]


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_every_architecture_folds_from_its_traced_projections(case):
    """Half of the units linear: every site folds (dense or factorised); the plan refolds a fresh model into the same
    structure; every unit linear: every FFN is affine (or its factorised pair, for a bottleneck) and no gate is left."""
    model, inputs = _build(case)
    hl.set_linear(model, 0.5)
    folded = hl.fold(model, example_inputs=inputs)
    _assert_folded(model, folded, inputs, {"dense", "factorised"})
    assert type(folded) is type(model)
    fresh, _ = _build(case)
    refolded = refold(fresh, fold_state(folded).plan)
    assert _shapes(refolded) == _shapes(folded)
    hl.set_linear(model, 1.0)
    linear = hl.fold(model, example_inputs=inputs, verify=False)  # checked here
    _assert_folded(model, linear, inputs, {"affine", "factorised"})
    assert not list(hl.gated_modules(linear))


def test_wav2vec2_folds_its_ffns_and_keeps_its_conv_sites_gated():
    """The convolutional feature extractor and positional convolution stay gated (k-wide convolutions, with a
    note); the Transformer FFNs fold; the model stays exact."""
    model, inputs = _build("wav2vec2")
    hl.set_linear(model, 0.5)
    folded = hl.fold(model, example_inputs=inputs)
    sites = hl.fold_report(folded)["sites"]
    conv = {name for name in sites if "feature_extractor" in name or "pos_conv" in name}
    assert len(conv) == 3 and all(sites[name]["form"] == "gated" and sites[name]["note"] for name in conv)
    _assert_folded(model, folded, inputs, {"gated", "dense", "factorised"})
    assert {sites[name]["form"] for name in set(sites) - conv} <= {"dense", "factorised"}


@pytest.mark.parametrize("case", GRID_CASES)
@pytest.mark.parametrize("fraction,structured", [(0.0, False), (0.9, False), (0.5, True)])
def test_fold_is_exact_and_smaller(case, fraction, structured):
    model, inputs = _shared_patched(case)
    _set_gates(model, fraction, structured)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = hl.fold(model, verify=False)
    _assert_folded(model, folded, inputs, {"unchanged", "affine", "dense", "factorised"})
    linear = hl.summary(model)["layers"]
    for name, site in hl.fold_report(folded)["sites"].items():
        assert site["linear"] == linear[name]["linear"]
        forms = ({"unchanged"} if site["linear"] == 0 else {"affine"} if site["linear"] == site["units"]
                 else {"dense", "factorised"})
        assert site["form"] in forms
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()
    assert len(list(hl.gated_modules(model))) == len(linear)


def test_gpt2_conv1d_folds_into_linear_and_generates_the_same_tokens():
    """GPT-2's ``Conv1D`` (weight ``[in, out]``, run as ``addmm``) folds into ``nn.Linear``s; generate still works."""
    model, inputs = _build("gpt2")
    hl.set_linear(model, 0.5)
    folded = hl.fold(model)
    mlp = folded.transformer.h[0].mlp
    assert isinstance(mlp.c_fc, FoldedInput) and isinstance(mlp.c_proj, nn.Linear) and isinstance(mlp.act, nn.Identity)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(folded.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0), expected)


def _mixtral(implementation: str, intermediate: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One Mixtral layer of 4 experts (patching verifies it, bit-exact at gate 0 at any width)."""
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(
        hidden_size=16, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100)).eval()
    model.config._experts_implementation = implementation
    inputs = {"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    return hl.patch_model(model, example_inputs=inputs), inputs


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_experts_fold_each_expert_on_its_own(implementation):
    """Expert e has e + 5 of 16 units linear: the fused block keeps 12 units per expert (11 nonlinear at most,
    rounded up to whole 16-byte rows), each expert moves 4 of its own linear units into the linear part and keeps
    the others in the block at gate 1."""
    model, inputs = _mixtral(implementation, 16)
    experts = model.model.layers[0].mlp.experts
    gates = dict(hl.gated_modules(model))
    masks = {}
    for e, (name, gate) in enumerate(gates.items()):
        masks[name] = torch.zeros(16, dtype=torch.bool)
        masks[name][torch.randperm(16, generator=torch.Generator().manual_seed(e))[:e + 5]] = True
    hl.set_linear(model, masks)
    first = next(iter(gates))
    gates[first].alpha.data[~masks[first]] = 0.3  # expert 0's nonlinear units keep a gate
    folded = hl.fold(model, example_inputs=inputs)
    _assert_folded(model, folded, inputs, {"factorised"})
    report = hl.fold_report(folded)["sites"]
    assert [report[name]["linear"] for name in gates] == [5, 6, 7, 8]
    new = folded.model.layers[0].mlp.experts
    assert isinstance(new, FoldedExperts) and new.block.gate_up_proj.shape == (4, 24, 16)
    lin_in, lin_out = new.linear
    for e, name in enumerate(gates):
        own = masks[name].nonzero().flatten()[:4]  # the expert's own linear units leave the block
        assert torch.equal(lin_in[e], experts.gate_up_proj[e, 16 + own].detach())
        assert torch.equal(lin_out[e], experts.down_proj[e][:, own].detach())
        kept = new.block.act_fn.experts[e].alpha.detach()
        assert int((kept == 1).sum()) == e + 1 and int((kept == 0.3).sum()) == (11 - e if e == 0 else 0)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(folded.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0), expected)
    fresh, _ = _mixtral(implementation, 16)
    assert _shapes(refold(fresh, fold_state(folded).plan)) == _shapes(folded)


def test_experts_dense_all_linear_and_zero_gates():
    """18 of 24 units linear per expert: 2 * 18 > 16, so each expert's linear units form one dense [16, 16] map;
    every unit linear: the fused block is gone; all gates 0: the experts module gets its bare activation back."""
    model, inputs = _mixtral("grouped_mm", 24)
    hl.set_linear(model, 0.75)
    folded = hl.fold(model, example_inputs=inputs)
    _assert_folded(model, folded, inputs, {"dense"})
    new = folded.model.layers[0].mlp.experts
    assert [tuple(p.shape) for p in new.linear] == [(4, 16, 16)] and new.block.down_proj.shape == (4, 16, 8)
    hl.set_linear(model, 1.0)
    folded = hl.fold(model, example_inputs=inputs)
    _assert_folded(model, folded, inputs, {"affine"})
    assert folded.model.layers[0].mlp.experts.block is None
    for _, gate in hl.gated_modules(model):
        gate.alpha.data.zero_()
    folded = hl.fold(model, example_inputs=inputs)
    experts = folded.model.layers[0].mlp.experts
    assert type(experts.act_fn) is type(model.model.layers[0].mlp.experts.act_fn.act)
    assert not experts._forward_pre_hooks and not list(hl.gated_modules(folded))


@pytest.mark.parametrize("case,size", [("timm_resnet", 32), ("timm_mobilenetv3", 64)])
def test_cnn_sites_stay_gated_and_squeeze_excite_folds(case, size):
    """Activations between k x k convolutions (or after a residual add, or before pooling) stay gated and say why;
    a squeeze-excite MLP of 1x1 convolutions (MobileNetV3) folds."""
    torch.manual_seed(0)
    model, _ = FAMILY_CASES[case]()
    inputs = _image(size)
    hl.patch_model(model.eval(), example_inputs=inputs)
    _set_gates(model, 0.9, structured=False)
    folded = hl.fold(model)
    with torch.no_grad():
        assert _close(run(model, inputs), run(folded, inputs)) <= 1e-5
    sites = hl.fold_report(folded)["sites"]
    squeeze_excite = {name for name in sites if ".se." in name}
    assert bool(squeeze_excite) == (case == "timm_mobilenetv3")
    assert all(sites[name]["form"] in ("dense", "factorised") for name in squeeze_excite)
    gated = {name: s for name, s in sites.items() if name not in squeeze_excite}
    assert {s["form"] for s in gated.values()} == {"gated"} and all(s["note"] for s in gated.values())
    assert "CNN activation stays gated" in gated["act1" if case == "timm_resnet" else "bn1.act"]["note"]  # the stem


class _InlineGlu(nn.Module):
    """A GLU computed inside a block that also adds its input: no module computes the gated FFN alone."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.gate(x)) * self.up(x))


def test_sites_that_cannot_fold_stay_gated_and_say_why():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(8, 16), shared, nn.Linear(16, 16), shared, nn.Linear(16, 8),
                          timm.layers.Mlp(8, 16, norm_layer=nn.LayerNorm), _InlineGlu(),
                          nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8)).eval()
    inputs = torch.randn(4, 8)
    hl.patch_model(model, example_inputs=inputs)
    hl.set_linear(model, 0.75)
    folded = hl.fold(model)
    sites = hl.fold_report(folded)["sites"]
    notes = {name: (s["form"], s["note"]) for name, s in sites.items()}
    assert notes["1.sites.0"][0] == notes["1.sites.1"][0] == "gated" and "shared activation" in notes["1.sites.0"][1]
    assert notes["5.act"][0] == "gated" and "layer_norm" in notes["5.act"][1]
    assert notes["6.act"][0] == "gated" and "no module of its own" in notes["6.act"][1]
    assert notes["8"] == ("dense", "")
    with torch.no_grad():
        assert _close(model(inputs), folded(inputs)) <= 1e-5


def test_a_linear_bottleneck_keeps_its_low_rank_pair():
    """Every unit linear, but 4 (16 + 16) < 16 * 16: the pair of projections without the activation is smaller than
    one dense map, for a plain FFN and for a gated one (timm SwiGLU)."""
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), timm.layers.SwiGLU(16, 4)).eval()
    inputs = torch.randn(3, 16)
    hl.set_linear(hl.patch_model(model, example_inputs=inputs), 1.0)
    folded = hl.fold(model)
    _assert_folded(model, folded, inputs, {"factorised"})
    assert [type(m).__name__ for m in folded] == ["Linear", "Identity", "Linear", "Sequential"]
    assert [tuple(m.weight.shape) for m in folded[3]] == [(4, 16), (16, 4)]


@pytest.mark.parametrize("case", ["whisper", "clip"])
def test_fold_checks_itself_on_the_probe_it_was_patched_with(case, monkeypatch):
    """Without example_inputs, fold traces and checks on the recorded probe: Whisper's log-mel features, CLIP's ids
    and pixels (every floating-point output compared: CLIP has no logits but logits_per_image, text_embeds, ...)."""
    model, _ = _build(case)
    hl.set_linear(model, 0.5)
    total = hl.fold_report(hl.fold(model))["total"]
    assert 0 < total["flops_after"] < total["flops_before"]
    monkeypatch.setattr("hf_linearize.folding._linear_response",
                        lambda gate, units: (torch.full((units.numel(),), 2.0, dtype=torch.float64),
                                             torch.zeros(units.numel(), dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="fold changed the model's output"):
        hl.fold(model)


def test_fold_without_any_input_says_what_to_pass():
    model, inputs = _build("mlp")
    hl.set_linear(model, 0.5)
    patch_state(model).probe = None  # as if patched without a recorded probe: no default input fits an nn.Sequential
    for verify in (True, False):
        with pytest.raises(ValueError, match="pass example_inputs="):
            hl.fold(model, verify=verify)
    assert hl.fold_report(hl.fold(model, example_inputs=inputs))["total"]["flops_before"] > 0


def test_forms_follow_the_mac_crossover():
    """Marian fixture: d = 16, encoder FFN 24, decoder FFN 20; dense M beats the factorised pair once
    |L| (16 + 16) > 16 * 16, i.e. |L| > 8."""
    model, _ = _build("marian")
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
    model, inputs = _build("marian")
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
    model, inputs = _build("t5_v1_1")
    folded = hl.fold(model)
    assert not list(hl.gated_modules(folded))
    ffn = folded.encoder.block[0].layer[-1].DenseReluDense
    assert type(ffn).__name__ == "T5DenseGatedActDense" and not isinstance(ffn.act, hl.GatedActivation)
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(folded, inputs))


def test_glu_sites_become_folded_modules():
    model, inputs = _build("timm_swiglu_vit")
    hl.set_linear(model, 0.75)
    folded = hl.fold(model)
    assert isinstance(folded.blocks[0].mlp, FoldedGluFFN)
    hl.set_linear(model, 1.0)
    assert isinstance(hl.fold(model).blocks[0].mlp, nn.Linear)  # a fully linear gated FFN is one affine map


def test_report_counts_flops():
    model, _ = _build("marian")
    hl.set_linear(model, 0.9)
    report = hl.fold_report(hl.fold(model))
    total = report["total"]
    assert 0 < total["flops_after"] < total["flops_before"]
    assert total["ffn_macs_after"] < total["ffn_macs_before"]
    assert "dense" in str(report) and "params" in str(report)


def test_verify_catches_a_wrong_fold(monkeypatch):
    model, _ = _build("marian")
    hl.set_linear(model, 0.5)
    monkeypatch.setattr("hf_linearize.folding._linear_response",
                        lambda gate, units: (torch.full((units.numel(),), 2.0, dtype=torch.float64),
                                             torch.zeros(units.numel(), dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="fold changed the model's output"):
        hl.fold(model)


LOW_PRECISION_CASES = [("marian", torch.bfloat16), ("llama", torch.float16), ("llama", torch.bfloat16)]


def _cast_half_linear(case: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Model ``case`` patched in fp32, half of its units linear, then cast to ``dtype`` (gates stay fp32)."""
    model, inputs = _build(case)
    hl.set_linear(model, 0.5)
    return model.to(dtype), inputs


@pytest.mark.parametrize("case, dtype", LOW_PRECISION_CASES)
def test_a_low_precision_fold_passes_its_check(case, dtype):
    """bf16/fp16: the gated model is off its fp32 self by the dtype's rounding, and the folded one no more than twice
    that (here within 4 eps of the output scale), so the check passes; every site folds as it does in fp32."""
    model, inputs = _cast_half_linear(case, dtype)
    folded = hl.fold(model, example_inputs=inputs)  # real ids: the recorded probe's are 0, LLaMA's padding token
    forms = {s["form"] for s in hl.fold_report(folded)["sites"].values()}
    assert forms <= {"dense", "factorised"}, "each projection check passes in the low precision too"
    assert {p.dtype for n, p in folded.named_parameters() if not n.endswith("alpha")} == {dtype}
    with torch.no_grad():
        assert _close(run(model, inputs).float(), run(folded, inputs).float()) <= 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("case, dtype", LOW_PRECISION_CASES)
def test_a_wrong_low_precision_fold_still_fails(case, dtype, monkeypatch):
    """One wrong row per site (the first linear unit dropped from the folded map) exceeds the rounding allowance.
    Marian's FFN weights get std 0.2: at the default init (0.02) one of its units moves the tiny model's output less
    than bf16 rounds it, so no check on the output could see it (nor could a user)."""
    model, inputs = _build(case)
    for name, param in model.named_parameters():
        if name.endswith(("fc1.weight", "fc2.weight")):
            param.data *= 10
    hl.set_linear(model, 0.5)

    def wrong(gate, units):
        slope, offset = _linear_response(gate, units)
        return torch.cat([slope[:1] * 0, slope[1:]]), offset

    monkeypatch.setattr("hf_linearize.folding._linear_response", wrong)
    with pytest.raises(RuntimeError, match="fold changed the model's output .*the gated model's own rounding"):
        hl.fold(model.to(dtype), example_inputs=inputs)


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


@pytest.mark.parametrize("case", ["t5", "t5_v1_1", "timm_swiglu_vit", "marian", "gpt2", "mixtral"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 1.0])
def test_affine_targets_fold_exactly(case, fraction):
    """A linear unit with target p x + q folds into W2[:, L] diag(p) W1[L] and W2[:, L] (p b1[L] + q); a GLU unit
    with constant target q into W2[:, L] diag(q) W_v[L]. T5 has no biases: the shift q must create one. Mixtral's
    experts keep linear units in their fused block at 0.6 (with their targets) and lose the block at 1.0."""
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
@pytest.mark.parametrize("case,affine", [("marian", False), ("t5_v1_1", False), ("timm_vit", False), ("t5", True),
                                         ("mixtral", True)])
def test_folded_checkpoint_round_trip(case, affine, tmp_path):
    model, inputs = _build(case)
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

    model, inputs = _build("marian")
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
    model, _ = _build("marian")
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
