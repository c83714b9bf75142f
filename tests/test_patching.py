"""patch_model / unpatch / gated_modules / set_linear / summary on every supported family."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import transformers as tf
from conftest import run
from torch import nn

import hf_linearize as hl
from hf_linearize.gates import GatedActivation

EXPECTED_SITES = {  # family -> (number of gated sites, gate kind)
    "marian": (4, "elementwise"), "bart": (4, "elementwise"), "mbart": (4, "elementwise"),
    "m2m100": (4, "elementwise"), "pegasus": (4, "elementwise"), "fsmt": (4, "elementwise"),
    "t5": (4, "elementwise"), "t5_v1_1": (4, "glu"), "mt5": (4, "glu"), "bert": (2, "elementwise"),
    "timm_resnet": (17, "elementwise"), "timm_convnext": (12, "elementwise"), "timm_vit": (2, "elementwise"),
    "timm_deit": (2, "elementwise"), "timm_swin": (4, "elementwise"), "timm_efficientnet": (49, "elementwise"),
    "timm_mobilenetv3": (33, "elementwise"), "timm_swiglu_vit": (2, "glu"), "torchvision_resnet": (17, "elementwise"),
}


def test_fresh_patch_is_exact(family_case):
    name, model, inputs = family_case
    with torch.no_grad():
        before = run(model, inputs)
        _patch(name, model, inputs)
        after = run(model, inputs)
    assert torch.equal(before, after), name
    gates = list(hl.gated_modules(model))
    count, kind = EXPECTED_SITES[name]
    assert len(gates) == count
    assert {g.kind for _, g in gates} == {kind}
    assert all(g.alpha.shape == (g.channels,) and not g.alpha.any() for _, g in gates)


def _patch(name: str, model: nn.Module, inputs) -> nn.Module:
    """Patch with the automatic probe input, except for torchvision models, which need ``example_inputs``."""
    return hl.patch_model(model, example_inputs=inputs if name.startswith("torchvision") else None)


def _site_inputs(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        g.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach().clone()))
        for n, g in hl.gated_modules(model)
    ]
    with torch.no_grad():
        run(model, inputs)
    for h in handles:
        h.remove()
    return seen


def test_all_linear_units_are_affine(family_case):
    """With every gate at 1 each gated unit is affine in its input: superposition to 1e-6 in fp32."""
    name, model, inputs = family_case
    _patch(name, model, inputs)
    assert hl.set_linear(model, 1.0) == hl.summary(model)["total"]["units"]
    site_inputs = _site_inputs(model, inputs)
    assert len(site_inputs) == EXPECTED_SITES[name][0]
    gates = dict(hl.gated_modules(model))
    for site, x in site_inputs.items():
        gate = gates[site]
        y = torch.randn_like(x)
        with torch.no_grad():
            lhs = gate(x + 2.0 * y) - gate(torch.zeros_like(x))
            rhs = (gate(x) - gate(torch.zeros_like(x))) + 2.0 * (gate(y) - gate(torch.zeros_like(x)))
        torch.testing.assert_close(lhs, rhs, atol=1e-6, rtol=0)
        expected = x if gate.kind == "elementwise" else torch.ones_like(x)
        assert torch.equal(gate(x), expected)


@pytest.mark.parametrize("case", ["t5_v1_1", "timm_swiglu_vit"])
def test_linear_glu_unit_is_linear_in_ffn_input(case):
    """For gated FFNs the whole unit act(u)*v becomes v: the FFN is affine in its input (T5 has no bias: linear)."""
    from conftest import FAMILY_CASES

    torch.manual_seed(0)
    model, _ = FAMILY_CASES[case]()
    model.eval()
    hl.patch_model(model)
    hl.set_linear(model, 1.0)
    gate_name, _ = next(hl.gated_modules(model))
    ffn = model.get_submodule(gate_name.rsplit(".", 1)[0]).double()  # fp64: the check is on the function, not on rounding
    d = next(m for m in ffn.modules() if isinstance(m, nn.Linear)).in_features
    x, y = torch.randn(3, 4, d, dtype=torch.float64), torch.randn(3, 4, d, dtype=torch.float64)
    with torch.no_grad():
        zero = ffn(torch.zeros_like(x))
        torch.testing.assert_close(ffn(x + y) - zero, (ffn(x) - zero) + (ffn(y) - zero), atol=1e-6, rtol=0)
    # With the gates back at 0 the same check fails: the test can tell a linear FFN from a nonlinear one.
    for _, g in hl.gated_modules(model):
        g.alpha.data.zero_()
    with torch.no_grad():
        zero = ffn(torch.zeros_like(x))
        assert (ffn(x + y) - zero - (ffn(x) - zero) - (ffn(y) - zero)).abs().max() > 1e-4


@pytest.mark.parametrize("case, sites, width", [("llama", "model.layers.{}.mlp.act_fn", 24),
                                                 ("timm_eva", "blocks.{}.mlp.act", 512)])
def test_readme_gated_ffns_llama_and_eva(case, sites, width):
    """The README's gated-FFN claims on a tiny LlamaForCausalLM (gate_proj/up_proj) and a timm EVA-02 (GluMlp):
    one GLU gate per FFN, exact when fresh; all linear, each FFN is linear in its input; unpatch restores."""
    from conftest import GLU_FFN_CASES

    torch.manual_seed(0)
    model, inputs = GLU_FFN_CASES[case]()
    model.eval()
    original = copy.deepcopy(model)
    with torch.no_grad():
        before = run(model, inputs)
    hl.patch_model(model)
    assert [(n, g.kind, g.channels) for n, g in hl.gated_modules(model)] == [
        (sites.format(i), "glu", width) for i in range(2)]
    with torch.no_grad():
        assert torch.equal(run(model, inputs), before)
    hl.set_linear(model, 1.0)
    ffn = model.get_submodule(sites.format(0).rsplit(".", 1)[0]).double()
    d = next(m for m in ffn.modules() if isinstance(m, nn.Linear)).in_features
    x, y = torch.randn(3, 4, d, dtype=torch.float64), torch.randn(3, 4, d, dtype=torch.float64)
    with torch.no_grad():
        zero = ffn(torch.zeros_like(x))
        torch.testing.assert_close(ffn(x + y) - zero, (ffn(x) - zero) + (ffn(y) - zero), atol=1e-9, rtol=0)
        if case == "llama":  # h = act(gate_proj x) * up_proj x becomes up_proj x, exactly
            assert torch.equal(ffn(x), ffn.down_proj(ffn.up_proj(x)))
        assert not torch.equal(run(model.float(), inputs), before)
    for _, gate in hl.gated_modules(model):
        gate.alpha.data.zero_()
    hl.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    with torch.no_grad():
        assert torch.equal(run(model, inputs), before)


def test_gradients_reach_gates(marian):
    model, inputs = marian
    hl.patch_model(model, hl.LinearizeConfig(gate_init=0.3))
    model.train()
    run(model, inputs).square().mean().backward()
    grads = [g.alpha.grad for _, g in hl.gated_modules(model)]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_state_dict_round_trip(marian):
    model, inputs = marian
    hl.patch_model(model)
    hl.set_linear(model, 0.5, seed=3)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch.manual_seed(123)
    fresh = hl.patch_model(tf.MarianMTModel(model.config).eval())
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(fresh, inputs))
    assert hl.summary(fresh) == hl.summary(model)


def test_unpatch_restores_original_modules(family_case):
    name, model, inputs = family_case
    original = copy.deepcopy(model)
    with torch.no_grad():
        before = run(model, inputs)
    _patch(name, model, inputs)
    hl.unpatch(model)
    assert not hl.is_patched(model)
    assert not any(isinstance(m, (hl.GatedActivation, hl.SharedGatedActivation)) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert [getattr(m, "inplace", None) for m in model.modules()] == [
        getattr(m, "inplace", None) for m in original.modules()
    ]
    assert all(not p._forward_pre_hooks for p in model.modules()), "reset hooks left behind"
    with torch.no_grad():
        assert torch.equal(run(model, inputs), before)


def test_unpatch_refuses_when_gates_moved(marian):
    model, _ = marian
    hl.patch_model(model)
    hl.set_linear(model, {"model.encoder.layers.0.activation_fn": 0.25})
    with pytest.raises(ValueError, match="6 unit\\(s\\) in 1 gated layer"):
        hl.unpatch(model)
    assert hl.is_patched(model)


def test_shared_activation_gets_one_gate_per_call_site():
    from conftest import FAMILY_CASES

    model, x = FAMILY_CASES["torchvision_resnet"]()
    model.eval()
    hl.patch_model(model, example_inputs=x)
    block = model.layer1[0]
    assert isinstance(block.relu, hl.SharedGatedActivation) and len(block.relu.sites) == 2
    calls = []
    block.relu.sites[0].register_forward_hook(lambda m, a, o: calls.append(0))
    block.relu.sites[1].register_forward_hook(lambda m, a, o: calls.append(1))

    def trace() -> dict[str, torch.Tensor]:
        """Output of the first call site (conv2's input), input and output of the second (after the add), logits."""
        seen: dict[str, torch.Tensor] = {}
        handles = [
            block.conv2.register_forward_pre_hook(lambda m, a: seen.update(first_out=a[0].clone())),
            block.relu.sites[1].register_forward_hook(
                lambda m, a, o: seen.update(second_in=a[0].clone(), second_out=o.clone())),
        ]
        with torch.no_grad():
            seen["logits"] = model(x)
        for handle in handles:
            handle.remove()
        return seen

    before = trace()
    assert calls == [0, 1]
    # Linearizing only the second call site of block.relu changes only what follows the residual add.
    assert hl.set_linear(model, {"layer1.0.relu.sites.1": 1.0}) == block.relu.sites[1].channels
    after = trace()
    assert calls == [0, 1, 0, 1]
    assert torch.equal(after["first_out"], before["first_out"]) and torch.equal(after["second_in"], before["second_in"])
    assert torch.equal(after["second_out"], after["second_in"]), "a linear unit is the identity"
    assert not torch.equal(before["second_out"], before["second_in"]) and (before["second_in"] < 0).any()
    assert not torch.equal(after["logits"], before["logits"])
    assert not block.relu.sites[0].alpha.any(), "the first call site's gates are untouched"


def test_set_linear_masks_and_fractions(marian):
    model, _ = marian
    hl.patch_model(model)
    name, gate = next(hl.gated_modules(model))
    mask = torch.zeros(gate.channels, dtype=torch.bool)
    mask[[1, 5]] = True
    assert hl.set_linear(model, {name: mask}) == 2
    assert gate.alpha[1] == 1.0 and gate.alpha[5] == 1.0 and gate.alpha.sum() == 2.0
    assert hl.set_linear(model, {name: mask}) == 0, "units that are linear already are not newly set"
    gate.alpha.data[7] = 0.9995  # linear by linear_threshold (1e-3), though not exactly 1
    mask[7] = True
    assert hl.set_linear(model, {name: mask}) == 0 and gate.alpha[7] == 1.0
    gate.alpha.data.zero_()
    assert hl.set_linear(model, 0.5) == sum(round(0.5 * g.channels) for _, g in hl.gated_modules(model))
    with pytest.raises(KeyError, match="gated_modules"):
        hl.set_linear(model, {"model.encoder.layers.0.fc1": 1.0})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        hl.set_linear(model, {name: torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        hl.set_linear(model, 1.5)


def test_summary_counts_and_table(marian):
    model, _ = marian
    hl.patch_model(model, hl.LinearizeConfig(linear_threshold=0.01))
    name, gate = next(hl.gated_modules(model))
    gate.alpha.data[:3] = torch.tensor([1.0, 0.995, 0.98])
    s = hl.summary(model)
    assert s["layers"][name] == {"units": 24, "linear": 2, "nonlinear": 22}
    assert s["total"]["units"] == 2 * 24 + 2 * 20 and s["total"]["linear"] == 2
    assert s["family"] == "seq2seq_fc"
    table = str(s)
    assert name in table and "TOTAL" in table and table.splitlines()[-1].split()[-3:] == ["88", "2", "86"]


def test_target_and_exclude_modules(marian):
    model, _ = marian
    hl.patch_model(model, hl.LinearizeConfig(target_modules=["activation_fn"], exclude_modules=r".*decoder.*"))
    assert [n for n, _ in hl.gated_modules(model)] == [
        "model.encoder.layers.0.activation_fn", "model.encoder.layers.1.activation_fn"]


def test_bert_defaults_skip_pooler_tanh_and_mlm_head():
    config = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24)
    model = hl.patch_model(tf.BertForPreTraining(config).eval())
    names = [n for n, _ in hl.gated_modules(model)]
    assert names == [f"bert.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)]


def test_real_pretrained_minilm_embeddings_unchanged(minilm_dir):
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir)
    model = tf.AutoModel.from_pretrained(minilm_dir).eval()
    batch = tokenizer(["A man is riding a horse.", "Zwei Hunde spielen im Schnee."], padding=True,
                      return_tensors="pt")

    def embed() -> torch.Tensor:
        with torch.no_grad():
            tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1)

    before = embed()
    hl.patch_model(model)
    assert len(list(hl.gated_modules(model))) == 6
    assert hl.summary(model)["total"]["units"] == 6 * 1536
    assert torch.equal(embed(), before)
    hl.set_linear(model, 1.0)
    assert not torch.allclose(embed(), before, atol=1e-3)  # the gates are really in the computation


# ------------------------------------------------------------------------------------------------ bad input
def _snapshot(model: nn.Module) -> list:
    return [(n, type(m)) for n, m in model.named_modules()]


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hl.patch_model("Helsinki-NLP/opus-mt-en-de")


def test_target_pattern_matching_nothing_lists_activations(marian):
    model, _ = marian
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"matched nothing.*activation_fn \(GELUActivation\)"):
        hl.patch_model(model, hl.LinearizeConfig(target_modules=["does_not_exist"]))
    assert _snapshot(model) == before and not hl.is_patched(model)


def test_target_that_is_not_an_activation(marian):
    model, _ = marian
    before = _snapshot(model)
    with pytest.raises(ValueError, match="is not an activation"):
        hl.patch_model(model, hl.LinearizeConfig(target_modules=["fc1"]))
    assert _snapshot(model) == before


def test_model_without_activations():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Activation-like modules in this model: none"):
        hl.patch_model(model, example_inputs=torch.randn(1, 4))


def test_patching_twice_is_an_error(marian):
    model, _ = marian
    hl.patch_model(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already patched"):
        hl.patch_model(model)
    assert _snapshot(model) == before


def test_generic_model_needs_example_inputs():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="pass example_inputs"):
        hl.patch_model(model)
    hl.patch_model(model, example_inputs=torch.randn(1, 4))
    assert [(n, g.channels, g.channel_dim) for n, g in hl.gated_modules(model)] == [("1", 8, -1)]
    assert hl.summary(model)["family"] == "generic"


def test_invalid_config_object(marian):
    model, _ = marian
    with pytest.raises(TypeError, match="LinearizeConfig"):
        hl.patch_model(model, {"gate_init": 0.0})


def test_gate_rejects_wrong_width():
    gate = GatedActivation(nn.ReLU(), 4)
    with pytest.raises(RuntimeError, match="expects 4 channels"):
        gate(torch.randn(2, 5))


@pytest.mark.parametrize(
    ("name", "kwargs", "image"),
    [
        ("vit_tiny_patch16_224", dict(img_size=32, depth=2), (3, 32, 32)),
        ("vit_tiny_patch16_224", dict(img_size=28, patch_size=4, depth=2), (3, 28, 28)),
        ("deit_tiny_patch16_224", dict(img_size=28, patch_size=7, depth=2, in_chans=1), (1, 28, 28)),
        ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), (3, 32, 32)),
        ("resnet18", dict(in_chans=1), (1, 224, 224)),
        ("convnext_atto", dict(in_chans=1), (1, 224, 224)),
        ("swin_tiny_patch4_window7_224", dict(img_size=112, depths=(1, 1, 1, 1), embed_dim=24,
                                              num_heads=(1, 1, 1, 1)), (3, 112, 112)),
    ],
)
def test_timm_probe_input_follows_the_model_as_built(name, kwargs, image):
    """No example_inputs: the probe image has the size and channels the model was created with."""
    import timm

    from hf_linearize.probe_inputs import timm_input_size

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs).eval()
    assert model.pretrained_cfg["input_size"] != image or name in ("resnet18", "convnext_atto")
    assert timm_input_size(model) == image
    x = torch.randn(2, *image)
    with torch.no_grad():
        before = model(x)
    hl.patch_model(model)
    assert len(list(hl.gated_modules(model))) > 0
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_timm_input_that_cannot_be_inferred_asks_for_example_inputs():
    """A model whose forward rejects the inferred probe gets an error naming it, not the model's assertion."""

    class FixedSize(nn.Sequential):
        pretrained_cfg = {"architecture": "fixed_size_net", "input_size": (3, 224, 224)}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-1] == 40, f"Input width ({x.shape[-1]}) doesn't match model (40)."
            return super().forward(x)

    model = FixedSize(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten())
    message = r"(?s)FixedSize \('fixed_size_net'\).*\(1, 3, 224, 224\).*pass example_inputs="
    with pytest.raises(ValueError, match=message):
        hl.patch_model(model)
    assert not hl.is_patched(model)
    hl.patch_model(model, example_inputs=torch.randn(1, 3, 40, 40))
    assert [n for n, _ in hl.gated_modules(model)] == ["1"]


# --------------------------------------------------------------------------------------------- traced layouts
def _tiny(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Tiny transformers of the layouts the data-flow probe must read (packed GLU, fused experts, dual encoder,
    audio, BLOOM's own GELU class)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 2]])
    moe = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
    if name == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=100, pad_token_id=0))
    elif name in ("mixtral", "mixtral_eager"):
        model = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=8, num_local_experts=4, **moe))
        if name == "mixtral_eager":
            model.config._experts_implementation = "eager"
    elif name == "qwen2_moe":
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(moe_intermediate_size=8, shared_expert_intermediate_size=12,
                                                         num_experts=4, num_experts_per_tok=2, **moe))
    elif name == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=100, max_position_embeddings=16),
            vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8)))
        return model.eval(), {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16)}
    elif name == "whisper":
        model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=24, num_mel_bins=8, max_source_positions=16, vocab_size=100,
            max_target_positions=16, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2))
        return model.eval(), {"input_features": torch.randn(1, 8, 32), "decoder_input_ids": ids[:, :4]}
    elif name == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=16, n_layer=2, n_head=2, vocab_size=100))
    else:
        raise KeyError(name)
    return model.eval(), {"input_ids": ids}


def _affine_defect(f, x: torch.Tensor) -> float:
    """Largest additivity/homogeneity residual of ``f`` around ``x``, relative to its output scale."""
    d, e = torch.randn_like(x), torch.randn_like(x)
    with torch.no_grad():
        fx, fd, fe = f(x), f(x + d), f(x + e)
        residual = max(float((f(x + d + e) - fd - fe + fx).abs().max()), float((f(x + 2 * d) - 2 * fd + fx).abs().max()))
    return residual / (float(fx.abs().max()) + 1.0)


def _ffn_blocks(name: str, model: nn.Module) -> list[tuple[str, object]]:
    """(site-name prefix, FFN as a function of its input) for each FFN block, written from the model's own
    modules (not the library's trace), with routing fixed for experts."""
    if name == "phi3":
        return [("model.layers.0.mlp", model.model.layers[0].mlp)]
    if name in ("mixtral", "mixtral_eager", "qwen2_moe"):
        blocks = []
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
            weights = torch.full((6, 2), 0.5)
            blocks.append((f"model.layers.{i}.mlp.experts", lambda h, ex=experts: ex(h.reshape(6, 16), index, weights)))
            if name == "qwen2_moe":
                blocks.append((f"model.layers.{i}.mlp.shared_expert", layer.mlp.shared_expert))
        return blocks
    if name == "clip":
        layers = [("text_model", model.text_model.encoder.layers[0]), ("vision_model", model.vision_model.encoder.layers[0])]
        return [(f"{p}.encoder.layers.0.mlp", lambda h, m=layer.mlp: m(h)) for p, layer in layers]
    if name == "whisper":
        return [(f"model.{part}.layers.0", lambda h, l=getattr(model.model, part).layers[0]: l.fc2(l.activation_fn(l.fc1(h))))
                for part in ("encoder", "decoder")]
    if name == "bloom":
        return [(f"transformer.h.{i}.mlp", lambda h, m=layer.mlp: m(h, torch.zeros_like(h)))
                for i, layer in enumerate(model.transformer.h)]
    raise KeyError(name)


TRACED = {  # case -> (number of gates, {(kind, channel_dim)}, units)
    "phi3": (1, {("glu", -1)}, 24),
    "mixtral": (8, {("glu", -1)}, 2 * 4 * 8),
    "mixtral_eager": (8, {("glu", -1)}, 2 * 4 * 8),
    "qwen2_moe": (10, {("glu", -1)}, 2 * (4 * 8 + 12)),
    "clip": (2, {("elementwise", -1)}, 32 + 24),
    "whisper": (2, {("elementwise", -1)}, 32 + 24),
    "bloom": (2, {("elementwise", -1)}, 2 * 64),
}


@pytest.mark.parametrize("case", sorted(TRACED))
def test_traced_layouts_gate_every_ffn_unit_correctly(case, tmp_path):
    """Default call; site count, kind and axis; bit-exact at gate 0; every FFN affine at gate 1 (independent
    check on the model's own modules); save/load round trip."""
    model, inputs = _tiny(case)
    with torch.no_grad():
        before = run(model, inputs)
    hl.patch_model(model)
    gates = dict(hl.gated_modules(model))
    count, layouts, units = TRACED[case]
    assert len(gates) == count, sorted(gates)
    assert {(g.kind, g.channel_dim) for g in gates.values()} == layouts
    assert hl.summary(model)["total"]["units"] == units
    with torch.no_grad():
        assert torch.equal(run(model, inputs), before)
    blocks = _ffn_blocks(case, model)
    hidden = torch.randn(1, 6, 16)
    assert all(_affine_defect(f, hidden) > 1e-4 for _, f in blocks)  # nonlinear at gate 0
    hl.set_linear(model, 1.0)
    for prefix, f in blocks:
        assert _affine_defect(f, hidden) < 1e-5, prefix
    hl.set_linear(model, {name: 0.5 for name in gates}, seed=1)
    hl.save_pretrained(model, tmp_path / "ckpt")
    loaded = hl.from_pretrained(tmp_path / "ckpt")
    saved, back = model.state_dict(), loaded.state_dict()
    assert set(saved) == set(back) and all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))
    assert hl.summary(loaded) == hl.summary(model)


@pytest.mark.parametrize("case", ["mixtral", "mixtral_eager"])
def test_expert_gate_acts_on_its_own_tokens_only(case):
    model, inputs = _tiny(case)
    hl.patch_model(model)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(6, 16)
    index = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 0]])
    weights = torch.full((6, 2), 0.5)
    with torch.no_grad():
        base = experts(hidden, index, weights)
        for expert in range(4):
            name = f"model.layers.0.mlp.experts.act_fn.experts.{expert}"
            hl.set_linear(model, {name: 1.0})
            changed = (experts(hidden, index, weights) != base).any(-1)
            assert torch.equal(changed, (index == expert).any(-1)), expert
            dict(hl.gated_modules(model))[name].alpha.zero_()


def test_one_activation_instance_called_at_two_places_gets_two_gates():
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 3))
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = model(x)
    hl.patch_model(model, example_inputs=x)
    assert model[1] is model[3]
    assert [n for n, _ in hl.gated_modules(model)] == ["1.sites.0", "1.sites.1"]
    with torch.no_grad():
        assert torch.equal(model(x), before)
    hl.set_linear(model, 1.0)
    assert _affine_defect(model, x) < 1e-6
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh_act = nn.ReLU()
    fresh = hl.patch_model(nn.Sequential(nn.Linear(4, 8), fresh_act, nn.Linear(8, 8), fresh_act, nn.Linear(8, 3)),
                           example_inputs=x)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for _, gate in hl.gated_modules(model):
        gate.alpha.data.zero_()
    hl.unpatch(model)
    assert type(model[1]) is nn.ReLU and model[1] is model[3]


class _ConvTransformerFFN(nn.Module):
    """Linear -> transpose -> activation -> 1x1 Conv1d -> transpose: the channels sit in dim 1 at the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.conv = nn.Linear(8, 16), nn.GELU(), nn.Conv1d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.fc(x).transpose(1, 2))).transpose(1, 2)


def test_channel_axis_comes_from_the_data_flow_through_a_transpose():
    model = _ConvTransformerFFN()
    x = torch.randn(1, 16, 8)  # 16 positions and 16 channels: shapes alone cannot tell the axis
    hl.patch_model(model, example_inputs=x)
    gate = model.act
    assert (gate.channel_dim, gate.channels) == (1, 16)
    other = torch.randn(2, 5, 8)  # another length works
    with torch.no_grad():
        before = model.conv(gate.act(model.fc(other).transpose(1, 2))).transpose(1, 2)
        assert torch.equal(model(other), before)
    hl.set_linear(model, 1.0)
    assert _affine_defect(model, other) < 1e-6


class _Multiplied(nn.Module):
    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value
        self.fc1, self.fc2, self.fc3, self.act = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 8), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.value == "tanh":
            return h * torch.tanh(self.fc2(x))
        return h * self.fc2(x) * self.fc3(x)


@pytest.mark.parametrize("value, message", [("tanh", "glu-other"), ("product", "fails verification")])
def test_site_that_cannot_be_made_linear_is_refused_and_model_left_intact(value, message):
    model = _Multiplied(value)
    x = torch.randn(3, 4)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match=message) as error:
        hl.patch_model(model, example_inputs=x)
    assert "'act'" in str(error.value) and "exclude_modules" in str(error.value)
    assert type(model.act) is nn.ReLU and not hl.patching.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_head_activations_are_not_sites_by_default():
    config = tf.DebertaV2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                vocab_size=100, max_position_embeddings=32)
    model = tf.DebertaV2ForMaskedLM(config).eval()
    hl.patch_model(model)
    names = [n for n, _ in hl.gated_modules(model)]
    assert names == ["deberta.encoder.layer.0.intermediate.intermediate_act_fn"]


def test_verify_false_skips_the_check():
    model = _Multiplied("product")
    hl.patch_model(model, example_inputs=torch.randn(3, 4), verify=False)
    assert hl.patching.is_patched(model)


def test_convolution_kernels_are_not_expert_stacks():
    """wav2vec2's feature extractor: Conv1d kernels are 3-D like a stack of experts, but its GELUs stay plain
    channels-first sites (the default probe feeds a raw waveform)."""
    config = tf.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                               conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                               num_conv_pos_embedding_groups=2)
    model = hl.patch_model(tf.Wav2Vec2Model(config).eval())
    gates = dict(hl.gated_modules(model))
    assert not any(isinstance(m, hl.ExpertGatedActivation) for m in model.modules())
    assert gates["encoder.layers.0.feed_forward.intermediate_act_fn"].channel_dim == -1
    assert gates["feature_extractor.conv_layers.0.activation"].channel_dim == 1
