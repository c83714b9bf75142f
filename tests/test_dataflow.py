"""The traced data flow: regions, layouts and replay on small hand-built modules and tiny transformers."""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

from hf_linearize import dataflow


class _GluMlp(nn.Module):
    def __init__(self, packed: bool) -> None:
        super().__init__()
        self.packed = packed
        self.gate_up = nn.Linear(4, 16) if packed else None
        self.gate, self.up = (None, None) if packed else (nn.Linear(4, 8), nn.Linear(4, 8))
        self.act, self.down = nn.SiLU(), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.gate_up(x).chunk(2, dim=-1) if self.packed else (self.gate(x), self.up(x))
        return self.down(self.act(u) * v)


def _region(module: nn.Module, x: torch.Tensor, site: str = "act") -> tuple[dataflow.ModelGraph, dataflow.Region]:
    with torch.no_grad():
        graph = dataflow.record(module, lambda: module(x), x, {site: module.get_submodule(site)})
    return graph, graph.region(graph.site_calls(site)[0])


def test_glu_layouts_packed_and_separate():
    for packed, layout, producers in ((True, "packed-glu", ["linear"]), (False, "glu", ["linear", "linear"])):
        _, region = _region(_GluMlp(packed), torch.randn(2, 3, 4))
        assert (region.kind, region.layout) == ("glu", layout)
        assert [p.name for p in region.producers] == producers
        assert [c.name for c in region.consumers] == ["linear"]


def test_elementwise_mlp_region_and_replay_reproduces_the_record():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Dropout(0.1), nn.Linear(8, 4)).eval()
    graph, region = _region(mlp, torch.randn(5, 4), site="1")
    assert region.kind == "elementwise" and region.multiplier is None
    env = graph.replay(region, {}, lambda op, x: op.func(x))
    for key in region.outputs:
        assert torch.equal(env[key], graph.values[key])


def test_in_place_update_is_a_new_value():
    """``out += shortcut`` (ResNet) writes a new value of the same tensor object: the region of the ReLU after it
    reads the sum, and replay leaves the earlier value intact."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x)
            out += x
            return self.act(out)

    graph, region = _region(Residual(), torch.randn(3, 4))
    assert [op.name for op in region.ops] == ["linear", "add_", "act"]
    env = graph.replay(region, {}, lambda op, x: op.func(x))
    assert torch.equal(env[region.site_op.writes[0]], graph.values[region.site_op.writes[0]])


def test_broadcast_scale_bounds_the_region_and_tanh_value_is_glu_other():
    class SqueezeExcite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.se = nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.conv(x))
            return h * torch.sigmoid(self.se(h.mean((2, 3), keepdim=True)))

    class TanhValue(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 8), nn.Linear(4, 8), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc1(x)) * torch.tanh(self.fc2(x))

    _, se = _region(SqueezeExcite(), torch.randn(1, 3, 5, 5))
    assert se.layout == "elementwise"
    _, other = _region(TanhValue(), torch.randn(2, 4))
    assert other.layout == "glu-other" and other.bounded_by == ["tanh"]


def test_affine_defect_separates_affine_from_bilinear():
    x = torch.randn(4, 8)
    weight = torch.randn(8, 8)
    defect, tolerance = dataflow.affine_defect(lambda v: [v[0] @ weight + 1.0], [x])
    assert defect <= tolerance
    defect, tolerance = dataflow.affine_defect(lambda v: [v[0] * (v[0] @ weight)], [x])
    assert defect > 1e3 * tolerance


def test_grouped_experts_weight_is_the_expert_stack():
    config = tf.MixtralConfig(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=2, num_local_experts=4, vocab_size=100)
    model = tf.MixtralForCausalLM(config).eval()
    site = "model.layers.0.mlp.experts.act_fn"
    ids = torch.tensor([[5, 6, 7, 8, 9, 2]])
    with torch.no_grad():
        graph = dataflow.record(model, lambda: model(input_ids=ids), ids, {site: model.get_submodule(site)})
    region = graph.region(graph.site_calls(site)[0])
    assert region.layout == "packed-glu"
    weight = graph.weight(region.producers[0])
    assert weight.dim() == 3 and weight.shape[0] == 4
