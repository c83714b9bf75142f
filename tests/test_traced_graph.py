"""Traced path graphs of real patched models: APL against hand-derived formulas and against the hand-built graphs
of every family (`reference_graphs`).

The formulas below are derived by hand from the graph conventions documented in `hf_linearize.traced_graph` and
read only the gate values and the model's structure, never the builder. Notation: ``f`` is a gated layer's
nonlinear fraction, ``w`` its width, ``d`` an attention layer's width (value channels).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import transformers as tf
from conftest import FAMILY_CASES
from reference_graphs import reference_graph
from tiny_models import ALL, DECODER_LMS
from torch import nn

import hf_linearize as hl
from hf_linearize.core_map import average_path_length, model_graph, path_length_report, unit_counts
from hf_linearize.path_length import apl, node_contributions

ENC_DEC = {"marian", "bart", "mbart", "m2m100", "pegasus", "fsmt", "t5", "t5_v1_1", "mt5"}
ENCODER = {"bert", "timm_vit", "timm_deit", "timm_swiglu_vit", "timm_swin"}  # stacks of attention + FFN residuals
RESNET = {"timm_resnet", "torchvision_resnet"}
MOBILE = {"timm_efficientnet", "timm_mobilenetv3"}


def close(got: float, want: Fraction, rel: float = 1e-12) -> bool:
    return math.isclose(got, float(want), rel_tol=rel, abs_tol=1e-12)


def patched(case: str) -> nn.Module:
    torch.manual_seed(0)
    model, inputs = FAMILY_CASES[case]()
    return hl.patch_model(model.eval(), example_inputs=inputs if case.startswith("torchvision") else None)


def layers(model: nn.Module, prefix: str = "", stack: str = "") -> list[tuple[str, int, Fraction]]:
    """(name, width, nonlinear fraction) of the gated layers under ``prefix`` (and in ``stack``, e.g.
    ``"encoder"``), straight from the gates."""
    limit = 1 - model._hf_linearize.config.linear_threshold
    return [(n, g.channels, Fraction(int((g.alpha < limit).sum()), g.channels))
            for n, g in hl.gated_modules(model) if n.startswith(prefix) and (not stack or stack in n.split("."))]


# --- hand formulas --------------------------------------------------------------------------------
def residual_stack(fw: list[tuple[Fraction, int]]) -> tuple[Fraction, Fraction]:
    """Residual blocks, each around one gated layer (fraction f, width w), plus 0-nonlinear attention
    residuals: the path takes each branch with probability 1/2 (normalized) or w / (w + 1) (unnormalized:
    w branch unit paths against the one skip path; blocks multiply, so they are independent)."""
    return sum(f / 2 for f, _ in fw), sum(Fraction(w, w + 1) * f for f, w in fw)


def encoder_decoder(
    enc: list[tuple[Fraction, int]], dec: list[tuple[Fraction, int]], d: int
) -> tuple[Fraction, Fraction]:
    """Encoder of residual blocks; the encoder output enters the cross-attention of each of the L decoder
    layers. Normalized: 1/L to each, so decoder FFN k (0-based) is reached with probability (k+1)/L and its
    branch taken with 1/2. Unnormalized: entering at layer j, the unit paths number (up to the common
    encoder factor) N_j = d * prod_{k>=j} (1 + w_k) * (1 + d)^(2 (L-1-j)) (cross-attention d units; then
    FFN residuals 1 + w_k and, after layer j, self- and cross-attention residuals 1 + d each); FFN k is
    reached by the entries j <= k."""
    big_l = len(dec)
    norm_enc, unnorm_enc = residual_stack(enc)
    entries = [d * math.prod(1 + w for _, w in dec[j:]) * (1 + d) ** (2 * (big_l - 1 - j)) for j in range(big_l)]
    normalized = norm_enc + sum(Fraction(k + 1, 2 * big_l) * f for k, (f, _) in enumerate(dec))
    unnormalized = unnorm_enc + sum(
        Fraction(sum(entries[: k + 1]), sum(entries)) * Fraction(w, w + 1) * f for k, (f, w) in enumerate(dec))
    return normalized, unnormalized


def resnet(model: nn.Module) -> tuple[Fraction, Fraction]:
    """Stem activation (passed by every path), then per block: branch activations with probability 1/2 or
    W / (W + S) (W = product of branch widths, S = 1 or the downsample width), post-add activation 1."""
    normalized = unnormalized = sum(f for n, _, f in layers(model) if not n.startswith("layer"))  # the stem
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            prefix = next(n for n, m in model.named_modules() if m is block) + "."
            *branch, (_, _, f_post) = layers(model, prefix)
            big_w = math.prod(w for _, w, _ in branch)
            skip = 1 if block.downsample is None else block.downsample[0].out_channels
            normalized += sum(f for *_, f in branch) / 2 + f_post
            unnormalized += Fraction(big_w, big_w + skip) * sum(f for *_, f in branch) + f_post
    return normalized, unnormalized


def mobile(model: nn.Module) -> tuple[Fraction, Fraction]:
    """Stem and head activations on every path; per block the main activations (probability P) and the
    squeeze-excite activation (a side branch: P/2 normalized, P r/(r+1) unnormalized for r units), with
    P = 1 without a skip, else 1/2 or W/(W+1), W = product of the main widths times (r + 1)."""
    outside = {n for n, *_ in layers(model) if not n.startswith("blocks.")}
    normalized = unnormalized = sum(f for n, _, f in layers(model) if n in outside)
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            units = layers(model, f"blocks.{s}.{i}.")
            main = [(w, f) for n, w, f in units if ".se." not in n]
            se = [(w, f) for n, w, f in units if ".se." in n]
            big_w = math.prod(w for w, _ in main) * math.prod(w + 1 for w, _ in se)
            p_norm, p_unnorm = (Fraction(1, 2), Fraction(big_w, big_w + 1)) if block.has_skip else (1, 1)
            normalized += p_norm * (sum(f for _, f in main) + sum(f / 2 for _, f in se))
            unnormalized += p_unnorm * (sum(f for _, f in main) + sum(Fraction(w, w + 1) * f for w, f in se))
    return normalized, unnormalized


def hand_apl(case: str, model: nn.Module) -> tuple[Fraction, Fraction]:
    """(normalized, unnormalized) APL of a patched family case, by hand."""
    if case in ENC_DEC:
        config = model.config
        d = config.num_heads * config.d_kv if case.startswith(("t5", "mt5")) else config.d_model
        enc, dec = ([(f, w) for _, w, f in layers(model, stack=s)] for s in ("encoder", "decoder"))
        return encoder_decoder(enc, dec, d)
    if case in ENCODER:
        return residual_stack([(f, w) for _, w, f in layers(model)])
    if case == "timm_convnext":  # one residual per block around [conv_dw (w/4 linear units), mlp (w units)]
        fw = [(f, w * (w // 4)) for _, w, f in layers(model)]
        return residual_stack(fw)
    if case in RESNET:
        return resnet(model)
    assert case in MOBILE
    return mobile(model)


def full_depth(case: str, model: nn.Module) -> Fraction:
    """Full depth: the normalized APL of the freshly patched model (every gated unit nonlinear), in block counts."""
    n_gates = len(list(hl.gated_modules(model)))
    if case in ENC_DEC:  # L_e / 2 + (L_d + 1) / 4
        return Fraction(len(layers(model, stack="encoder")), 2) + Fraction(len(layers(model, stack="decoder")) + 1, 4)
    if case in ENCODER | {"timm_convnext"}:  # half of the blocks
        return Fraction(n_gates, 2)
    if case in RESNET:  # stem + 3/2 per BasicBlock
        return 1 + Fraction(3, 2) * ((n_gates - 1) // 2)
    # EfficientNet/MobileNet: stem and head activations, plus per block P * (main activations + SE activation / 2)
    # with P = 1/2 for a block with a skip, else 1.
    names = [n for n, _ in hl.gated_modules(model)]
    depth = Fraction(sum(not n.startswith("blocks.") for n in names))
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            inside = [n for n in names if n.startswith(f"blocks.{s}.{i}.")]
            se = sum(".se." in n for n in inside)
            depth += Fraction(1, 2 if block.has_skip else 1) * (len(inside) - se + Fraction(se, 2))
    return depth


# --- tests on every family --------------------------------------------------------------------------
def test_family_graph(family_case):
    """Fresh model = full depth; random linearization = hand formula; linearizing never raises APL; all
    linear = 0."""
    case, model, inputs = family_case
    hl.patch_model(model, example_inputs=inputs if case.startswith("torchvision") else None)
    assert close(average_path_length(model), full_depth(case, model))
    for seed in range(2):
        normalized, unnormalized = hand_apl(case, model)
        assert close(average_path_length(model, normalized=True), normalized), (case, seed)
        assert close(average_path_length(model, normalized=False), unnormalized), (case, seed)
        gen = torch.Generator().manual_seed(seed)
        hl.set_linear(model, {n: float(torch.rand((), generator=gen)) for n, _ in hl.gated_modules(model)}, seed=seed)

    gen = torch.Generator().manual_seed(5)
    before = (average_path_length(model, True), average_path_length(model, False))
    gates = list(hl.gated_modules(model))
    for _ in range(6):  # one more linear unit at a time, in random layers
        name, gate = gates[int(torch.randint(len(gates), (), generator=gen))]
        mask = torch.zeros(gate.channels, dtype=torch.bool)
        mask[int(torch.randint(gate.channels, (), generator=gen))] = True
        hl.set_linear(model, {name: mask})
        after = (average_path_length(model, True), average_path_length(model, False))
        assert after[0] <= before[0] and after[1] <= before[1]
        before = after
    hl.set_linear(model, 1.0)
    assert average_path_length(model, True) == 0.0 and average_path_length(model, False) == 0.0


def test_small_encoder_decoder_by_hand():
    """Marian, d = 4: encoder layer (FFN 4 units, 2 linear), decoder layers 0 and 1 (FFN 2 units, 1 and 0 linear).

    Normalized: encoder FFN 1/2 * 1/2 = 1/4; enc_out enters cross-attention 0 or 1 with 1/2 each, so
    FFN 0 is reached with 1/2: 1/2 * 1/2 * 1/2 = 1/8; FFN 1 with 1: 1/2 * 1 = 1/2. Total 7/8.
    Unnormalized: the encoder has (1+4)(1+4) = 25 unit paths. Entering decoder layer 0: 25 * 4 (cross-attention)
    * 3 (FFN 0) * 5 * 5 (layer 1 self- and cross-attention residuals) * 3 (FFN 1) = 22500 paths; entering
    layer 1: 25 * 4 * 3 = 300. Encoder FFN 4/5 * 1/2 = 2/5; FFN 0: 22500/22800 * 2/3 * 1/2 = 75/228;
    FFN 1: 2/3 * 1. Total 2/5 + 75/228 + 2/3 = 1591/1140.
    """
    config = tf.MarianConfig(vocab_size=16, pad_token_id=0, decoder_start_token_id=0, d_model=4, encoder_layers=1,
                             decoder_layers=2, encoder_attention_heads=1, decoder_attention_heads=1,
                             encoder_ffn_dim=4, decoder_ffn_dim=2, max_position_embeddings=16)
    model = hl.patch_model(tf.MarianMTModel(config).eval())
    hl.set_linear(model, {"model.encoder.layers.0.activation_fn": 0.5, "model.decoder.layers.0.activation_fn": 0.5})
    assert close(average_path_length(model), Fraction(7, 8))
    assert close(average_path_length(model, normalized=False), Fraction(1591, 1140))


@pytest.mark.parametrize("kind", ["hf_vit", "distilbert"])
def test_hf_encoders(kind):
    if kind == "hf_vit":
        model = tf.ViTModel(tf.ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=24, image_size=32, patch_size=8))
    else:
        model = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, hidden_dim=24))
    torch.manual_seed(0)
    hl.patch_model(model.eval())
    assert len(list(hl.gated_modules(model))) == 3
    assert close(average_path_length(model), Fraction(3, 2))
    hl.set_linear(model, {n: frac for (n, _), frac in zip(hl.gated_modules(model), (0.25, 0.5, 1.0))})
    normalized, unnormalized = residual_stack([(f, w) for _, w, f in layers(model)])
    assert close(average_path_length(model), normalized) and close(average_path_length(model, False), unnormalized)


def test_mlp_chain():
    """A plain MLP is a chain: both forms are the sum of the fractions; an ungated activation counts 0 + cost."""
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4),
                          nn.Tanh(), nn.Linear(4, 1))
    hl.patch_model(model, example_inputs=torch.randn(2, 3))
    assert [n for n, _ in hl.gated_modules(model)] == ["1", "4"]  # Tanh is not gated by default
    assert average_path_length(model) == average_path_length(model, normalized=False) == 2.0
    hl.set_linear(model, {"1": 0.25, "4": 0.5})
    for normalized in (True, False):
        assert close(average_path_length(model, normalized), Fraction(3, 4) + Fraction(1, 2))
        assert close(average_path_length(model, normalized, ungated_cost=0.5), Fraction(5, 4) + Fraction(1, 2))


# --- ungated costs ----------------------------------------------------------------------------------
def test_ungated_cost_post_ln_encoder():
    """BERT (post-LN): embedding norm, then per layer attention softmax on the branch (1/2 or d/(d+1)) and two
    norms on the stream (1 each)."""
    model, c, big_l, d = patched("bert"), 0.25, 2, 16
    hl.set_linear(model, 0.5)
    normalized, unnormalized = hand_apl("bert", model)
    assert close(average_path_length(model, True, c), normalized + c * (1 + big_l * (Fraction(1, 2) + 2)))
    assert close(average_path_length(model, False, c), unnormalized + c * (1 + big_l * (Fraction(d, d + 1) + 2)))


def test_ungated_cost_pre_ln_vit():
    """timm ViT (pre-LN): per block norm1 + softmax on the attention branch, norm2 on the MLP branch; final norm."""
    model, c = patched("timm_vit"), 0.5
    d, w, big_l = 192, 768, 2
    normalized, unnormalized = hand_apl("timm_vit", model)
    assert close(average_path_length(model, True, c), normalized + c * (1 + big_l * Fraction(3, 2)))
    assert close(average_path_length(model, False, c),
                 unnormalized + c * (1 + big_l * (2 * Fraction(d, d + 1) + Fraction(w, w + 1))))


def test_ungated_cost_encoder_decoder():
    """Marian (post-LN), L = 2 per stack, normalized. Encoder layer: softmax 1/2 + two stream norms = 5/2.
    Decoder layer k, stream reached with k/L before it: self-attention softmax k/(2L), its norm k/L,
    cross-attention softmax k/(2L) + 1/L, then two norms (k+1)/L each: 3/2 (k=0) and 7/2 (k=1)."""
    model, c = patched("marian"), 0.5
    want = Fraction(7, 4) + c * (2 * Fraction(5, 2) + Fraction(3, 2) + Fraction(7, 2))
    assert close(average_path_length(model, True, c), want)


# --- coverage and errors ----------------------------------------------------------------------------
def test_excluded_ffn_counts_as_ungated():
    """An FFN excluded from gating keeps its layer (and fork) with 0 nonlinear units, plus the ungated cost."""
    torch.manual_seed(0)
    model, _ = FAMILY_CASES["marian"]()
    hl.patch_model(model.eval(), hl.LinearizeConfig(exclude_modules=r".*decoder.*"))
    enc = [(Fraction(1), 24)] * 2
    normalized, unnormalized = encoder_decoder(enc, [(Fraction(0), 20)] * 2, 16)
    assert close(average_path_length(model), normalized) and close(average_path_length(model, False), unnormalized)
    # With cost 1 an ungated FFN counts as a fully nonlinear one: the same APL as the fully gated fresh model.
    fresh = patched("marian")
    for normalized in (True, False):
        assert close(average_path_length(model, normalized, 1.0), average_path_length(fresh, normalized, 1.0))


def test_any_module_and_partly_gated_cnns():
    """A custom module and a conv stack get a graph; a CNN with ungated activations counts them as layers of 0
    nonlinear units (+ cost): the same APL as the fully gated CNN with those units linear (cost 0) or nonlinear
    (cost 1)."""
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.fc(x))) + x[:, :2]  # a residual around the FFN

    model = hl.patch_model(Custom(), example_inputs=torch.randn(1, 4))
    assert close(average_path_length(model), Fraction(1, 2))
    assert close(average_path_length(model, normalized=False), Fraction(4, 5))
    conv = hl.patch_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.GELU()),
                          example_inputs=torch.randn(1, 3, 8, 8))
    assert average_path_length(conv) == 2.0
    with pytest.raises(ValueError, match="not patched"):
        average_path_length(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))

    torch.manual_seed(0)
    partly, _ = FAMILY_CASES["timm_resnet"]()
    hl.patch_model(partly.eval(), hl.LinearizeConfig(exclude_modules=["act2"]))
    full = patched("timm_resnet")
    act2 = {n: 1.0 for n, _ in hl.gated_modules(full) if n.endswith("act2")}
    assert act2 and not any(n.endswith("act2") for n, _ in hl.gated_modules(partly))
    for normalized in (True, False):
        assert close(average_path_length(partly, normalized, 1.0), average_path_length(full, normalized, 1.0))
    hl.set_linear(full, act2)
    for normalized in (True, False):
        assert close(average_path_length(partly, normalized), average_path_length(full, normalized))


def test_sites_off_the_path_add_nothing_and_bad_costs(caplog):
    """A gated site on no input-to-output path (BERT's pooler: the main output is the last hidden state) is logged
    once and adds 0; the report lists it with 0 calls."""
    bert, _ = FAMILY_CASES["bert"]()
    hl.patch_model(bert.eval(), hl.LinearizeConfig(target_modules=r".*(intermediate_act_fn|pooler\.activation)"))
    with caplog.at_level("WARNING", logger="hf_linearize.core_map"):
        assert close(average_path_length(bert), Fraction(1))  # the two FFN branches, 1/2 each
    assert "['pooler.activation'] lie on no path" in caplog.text
    report = path_length_report(bert)
    assert report["layers"]["pooler.activation"]["calls"] == 0
    assert report["layers"]["pooler.activation"]["contribution_normalized"] == 0.0
    with pytest.raises(ValueError, match="ungated_cost"):
        average_path_length(patched("marian"), ungated_cost=-1.0)


def test_decoder_nodes_off_source_paths_are_left_out():
    graph = model_graph(patched("bart"))
    names = set(graph.names)
    assert "model.decoder.layers.0.encoder_attn" in names and "model.decoder.layers.1.self_attn" in names
    assert "model.decoder.layers.0.self_attn" not in names and "model.decoder.layernorm_embedding" not in names
    assert "model.encoder.layernorm_embedding" in names
    cross = graph.names.index("model.decoder.layers.0.encoder_attn")
    assert [graph.names[p] for p in graph.pred[cross]] == ["model.encoder.layers.1.final_layer_norm"]


# --- the traced graph against the hand-built graph of every family ---------------------------------------
def test_traced_graph_matches_the_hand_built_graph(family_case):
    """Both APL forms and every gated layer's contributions, at 0%, 50% and 100% linear, with and without an
    ungated cost, to 1e-9."""
    case, model, inputs = family_case
    hl.patch_model(model, example_inputs=inputs if case.startswith("torchvision") else None)
    for fraction in (0.0, 0.5, 1.0):
        if fraction:
            hl.set_linear(model, fraction)
        sites = unit_counts(model)
        for cost in (0.0, 0.5):
            traced, hand = model_graph(model, cost), reference_graph(model, sites, cost)
            for normalized in (True, False):
                assert math.isclose(apl(traced, normalized), apl(hand, normalized), rel_tol=1e-9, abs_tol=1e-12)
                got, want = node_contributions(traced, normalized), node_contributions(hand, normalized)
                for name in sites:
                    assert math.isclose(got[name], want[name], rel_tol=1e-9, abs_tol=1e-12), (case, name)


# --- every architecture that patches: hand-derived values on tiny configs ---------------------------------
SEQUENTIAL = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "bloom", "deberta_v2",
              "albert", "dinov2", "hf_swin", "distilbert", "hf_vit",
              "timm_vit_swiglu"}
"""A chain of residual sub-blocks (attention, FFN): the FFN branch is taken with 1/2 (normalized) or w/(w+1)."""
PARALLEL = {"gptj": 2, "falcon": 2, "phi": 2, "gpt_neox": 3}
"""Attention and FFN side by side on one residual: the stream forks into the skip and one shared norm (GPT-J,
Falcon, Phi: the FFN gets 1/2 * 1/2) or two norms (GPT-NeoX: 1/3); unnormalized w / (1 + d + w), d = 16."""


def _fraction(gate: nn.Module, model: nn.Module) -> Fraction:
    limit = 1 - model._hf_linearize.config.linear_threshold
    return Fraction(int((gate.alpha < limit).sum()), gate.channels)


def _expected(case: str, model: nn.Module) -> tuple[Fraction, Fraction]:
    gates = dict(hl.gated_modules(model))
    f = {name: _fraction(gate, model) for name, gate in gates.items()}
    w = {name: gate.channels for name, gate in gates.items()}
    if case in SEQUENTIAL:
        calls = 2 if case == "albert" else 1  # ALBERT: one layer (one gate) used at both depths
        return (sum(calls * f[n] / 2 for n in gates),
                sum(calls * Fraction(w[n], w[n] + 1) * f[n] for n in gates))
    if case in PARALLEL:
        return (sum(f[n] / (2 * PARALLEL[case]) if PARALLEL[case] == 2 else f[n] / 3 for n in gates),
                sum(Fraction(w[n], 1 + 16 + w[n]) * f[n] for n in gates))
    if case == "mixtral":  # 4 experts of 8 units behind the route node: 1/2 * 1/4 each; 8 / (1 + 4 * 8)
        return sum(f[n] / 8 for n in gates), sum(Fraction(8, 33) * f[n] for n in gates)
    if case == "qwen2_moe":  # the FFN norm forks into shared expert, route, shared-expert gate (1/3 each)
        shared = {n for n in gates if "shared_expert" in n}
        return (sum(f[n] / 6 if n in shared else f[n] / 24 for n in gates),
                sum(Fraction(12 if n in shared else 8, 46) * f[n] for n in gates))
    if case == "whisper":
        enc = [(f[n], w[n]) for n in gates if ".encoder." in n]
        dec = [(f[n], w[n]) for n in gates if ".decoder." in n]
        return encoder_decoder(enc, dec, 16)
    if case == "wav2vec2":  # conv feature extractor (a chain), positional conv on a residual, post-LN layers
        chain = {n for n in gates if "feature_extractor" in n}
        return (sum(f[n] if n in chain else f[n] / 2 for n in gates),
                sum(f[n] if n in chain else Fraction(w[n], w[n] + 1) * f[n] for n in gates))
    if case == "clip":  # the towers meet at the logits: 1/2 each, or by their unit paths 17*25 and 17*33
        vision, text = (next(f[n] for n in gates if n.startswith(f"{tower}_model")) for tower in ("vision", "text"))
        # each main input is a node: the towers get 1/2 each
        return vision / 4 + text / 4, (Fraction(425, 986) * Fraction(24, 25) * vision
                                       + Fraction(561, 986) * Fraction(32, 33) * text)
    if case == "hf_convnext":  # branch [dwconv (dim linear units), norm, FFN]
        dims = {n: model.get_submodule(n.rsplit(".", 1)[0]).dwconv.out_channels for n in gates}
        return (sum(f[n] / 2 for n in gates),
                sum(Fraction(dims[n] * w[n], dims[n] * w[n] + 1) * f[n] for n in gates))
    assert case == "timm_regnet"
    return _regnet(model, f, w)


def _regnet(model: nn.Module, f: dict[str, Fraction], w: dict[str, int]) -> tuple[Fraction, Fraction]:
    """Stem activation; per block a residual around [conv1 act, conv2 act, squeeze-excite side branch (se act,
    sigmoid)] with an identity or projection shortcut (its output channels), then act3 on the stream."""
    normalized = unnormalized = f["stem.bn.act"]
    for stage in (model.s1, model.s2, model.s3, model.s4):
        for block in stage.children():
            p = next(n for n, m in model.named_modules() if m is block) + "."
            a1, a2, se, a3 = (p + s for s in ("conv1.bn.act", "conv2.bn.act", "se.act", "act3"))
            big_w = w[a1] * w[a2] * (w[se] + 1)
            skip = 1 if isinstance(block.downsample, nn.Identity) else block.downsample.conv.out_channels
            normalized += (f[a1] + f[a2] + f[se] / 2) / 2 + f[a3]
            unnormalized += Fraction(big_w, big_w + skip) * (f[a1] + f[a2] + Fraction(w[se], w[se] + 1) * f[se])
            unnormalized += f[a3]
    return normalized, unnormalized


@pytest.mark.parametrize("case", sorted(ALL))
def test_every_architecture_has_a_path_graph(case):
    """Fresh, first layer fully linear, random fractions: both forms equal the hand-derived value."""
    torch.manual_seed(0)
    model, inputs = ALL[case]()
    hl.patch_model(model, example_inputs=inputs)
    gates = [n for n, _ in hl.gated_modules(model)]
    first = [n for n in gates if n.startswith(gates[0].rsplit(".", 3)[0])][:1] if case != "albert" else gates
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        if step == 1:
            hl.set_linear(model, {n: 1.0 for n in first})
        if step == 2:
            hl.set_linear(model, {n: float(torch.rand((), generator=generator)) for n in gates})
        normalized, unnormalized = _expected(case, model)
        assert close(average_path_length(model), normalized, rel=1e-9), (case, step)
        assert close(average_path_length(model, normalized=False), unnormalized, rel=1e-9), (case, step)
    report = path_length_report(model)
    assert set(report["layers"]) == set(gates)
    assert math.isclose(report["normalized_apl"], float(normalized), rel_tol=1e-9)


def test_moe_experts_are_parallel_branches_in_every_implementation():
    """Fused (grouped_mm, batched_mm) and eager experts give the same graph: one route node forking into one layer
    node per expert; the report lists every expert as a layer of its own."""
    graphs = []
    for implementation in ("grouped_mm", "batched_mm", "eager"):
        torch.manual_seed(0)
        model, inputs = ALL["mixtral"]()
        model.config._experts_implementation = implementation
        hl.patch_model(model, example_inputs=inputs)
        hl.set_linear(model, {"model.layers.0.mlp.experts.act_fn.experts.2": 1.0})
        graph = model_graph(model)
        graphs.append((graph.names, [sorted(p) for p in graph.pred], apl(graph, True), apl(graph, False)))
        route = graph.names.index("model.layers.0.mlp.experts.act_fn:route")
        experts = [v for v in graph.succ[route]]
        assert [graph.names[v] for v in experts] == [f"model.layers.0.mlp.experts.act_fn.experts.{e}" for e in range(4)]
    assert graphs[0] == graphs[1] == graphs[2]
    report = path_length_report(model)
    assert report["layers"]["model.layers.0.mlp.experts.act_fn.experts.2"]["nonlinear"] == 0
    assert report["layers"]["model.layers.0.mlp.experts.act_fn.experts.1"]["contribution_normalized"] == 1 / 8


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_decoder_lm_graph_by_hand(case):
    """2-layer LM: fresh, normalized APL 1 (two FFN branches of 1/2); layer 0 fully linear: 1/2."""
    torch.manual_seed(0)
    model, inputs = DECODER_LMS[case]()
    hl.patch_model(model)
    assert average_path_length(model) == 1.0
    hl.set_linear(model, {n: 1.0 for n, _ in hl.gated_modules(model) if ".0." in n})
    assert average_path_length(model) == 0.5
