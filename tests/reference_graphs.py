"""Hand-built path graphs of the model families: the reference the traced graphs
(:mod:`hf_linearize.traced_graph`) are tested against.

These builders were the library's path graphs before the graph was traced from the model's forward pass; they
stay as an independent description of each family. A builder reads a patched model plus the unit counts of its
gated sites and returns a :class:`~hf_linearize.path_length.PathGraph`. Builders describe a model as a short list
of *steps* (:class:`Layer` nodes and :class:`Residual` forks) and :func:`build` turns the steps into the graph.

Conventions shared by every family
----------------------------------
* **Input and output.** The graph input is the model input (the *source* tokens of an encoder-decoder,
  the pixels of a vision model). The output is the last hidden state of the (decoder) stack for
  Transformers; task heads are not part of the graph (LM heads and classifiers are linear; the BERT/ViT
  pooler tanh is left out). For CNNs the output is the logits (the maps after the last activation are
  linear and change neither APL).
* **Gated sites** are layer nodes named as :func:`~hf_linearize.patching.gated_modules` names them:
  ``width`` = the site's units, ``nonlinear`` = its units with gate ``< 1 - linear_threshold``. A GLU unit
  ``act(u) * v`` is one unit, nonlinear until its gate reaches 1.
* **Residual streams** are width-1 map nodes. A residual sub-block is a fork at the stream node into
  its branch and the skip, merged by a map node ``<name>:add``; maps inside a branch are dense edges.
  Output projections (attention ``out_proj``, FFN ``fc2``, a block's last convolution) are the edges into
  the merge, not nodes of their own: each branch holds exactly the unit layers it computes.
* **Ungated nonlinearities** are nodes with the constant cost ``ungated_cost`` (default 0): the softmax of
  every attention node; every LayerNorm/RMSNorm (``<sub-block>:norm`` nodes, on the branch for pre-LN, on
  the stream after the merge for post-LN, embedding and final norms on the stream; a norm inside a task head,
  such as timm ConvNeXt's ``head.norm``, is part of the head and left out); max-pooling; the
  squeeze-excite sigmoid (``<se>:gate``); and a Transformer FFN activation that was excluded from gating
  (it keeps its layer node, with 0 nonlinear units). With the default cost 0, pre-LN and post-LN give the
  same APL.

The graph of each family
------------------------
* ``seq2seq_fc`` (Marian, BART, mBART, M2M100, Pegasus, FSMT, ...) and ``t5`` (T5, T5 v1.1, mT5, ...):
  each layer is a chain of residual sub-blocks on its stack's stream: self-attention (one linear layer of
  the value channels, ``n_heads * d_head`` wide), cross-attention (decoder only, as wide), FFN (the gated
  site, ``d_ff`` wide). Encoder: ``input -> layer 1 ... layer L -> enc_out``. ``enc_out`` enters the
  cross-attention node of *every* decoder layer (normalized: 1/L each), which the decoder stream feeds
  too, so a source path joins the decoder at any layer and runs down its stream to the output. The
  decoder embeddings and layer 1's self-attention are on no source path and are not in the graph
  (layer 1's cross-attention node is entered from ``enc_out`` only). Pre-LN (mBART, M2M100, Pegasus, T5:
  the stacks with a final norm) or post-LN (Marian, BART, FSMT) only moves the ``:norm`` nodes.
  Decoder-only models (``BartForCausalLM``) are not supported yet.
* ``bert`` / ``distilbert`` / ``hf_vit``: one such encoder stack (no cross-attention), from the
  embeddings to the last hidden state.
* ``timm_transformer``: a ViT/DeiT/EVA/Swin block is two residual sub-blocks, ``[norm1, attn]`` and
  ``[norm2, mlp]`` (attention node ``attn.proj.in_features`` wide). A ConvNeXt block is one residual with
  the branch ``[conv_dw (linear, dim wide), norm, mlp]`` and an identity skip (projection shortcuts are
  not supported yet). The norms of the stem and of patch merging / stage downsampling are cost nodes on the
  stream.
* ``timm_cnn`` / ``torchvision_resnet``: the activations in module order form a chain. A ResNet
  BasicBlock/Bottleneck is a residual whose branch holds all its activations but the last; the skip is
  the identity or the downsample (a linear layer ``out_channels`` wide); the last activation follows the
  add, on the stream. An EfficientNet/MobileNet block (``has_skip``) is a residual around its activations
  when it has a skip; otherwise they are inline in the chain. Squeeze-excite, ``x * sigmoid(W2 act(W1
  pool(x)))``, is a side branch: a fork at its input into ``[se act, <se>:gate]`` and the direct path,
  merged at ``<se>:mul``. Max-pooling is a cost node. Every CNN activation must be gated (the family
  default).
* ``generic``: an ``nn.Sequential`` of ``Linear`` layers and activations is the chain of its activation
  layers (an ungated activation counts 0, plus the cost). Other models are not supported yet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from hf_linearize.families import find_family
from hf_linearize.gates import GatedActivation, SharedGatedActivation
from hf_linearize.path_length import PathGraph

Sites = Mapping[str, tuple[int, int]]
"""Gated site name -> (units, nonlinear units)."""

GraphBuilder = Callable[[nn.Module, Sites, float], PathGraph]
"""``builder(model, sites, ungated_cost) -> PathGraph``; ``NotImplementedError`` for a layout it cannot read."""


# --------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Layer:
    """A node: ``width`` units of which ``nonlinear`` count (a map node when width is 1), plus ``cost``.

    ``source=True`` marks a cross-attention node, which the encoder output also enters.
    """

    name: str
    width: int = 1
    nonlinear: float = 0
    cost: float = 0.0
    source: bool = False


@dataclass(frozen=True)
class Residual:
    """A fork into the chained ``branch`` and ``skip`` (identity when empty), merged by a map node ``name``."""

    name: str
    branch: tuple[Step, ...]
    skip: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        if not self.branch:
            raise ValueError(f"Residual {self.name!r}: the branch must hold at least one step.")


Step = Union[Layer, Residual]


def _add_steps(g: PathGraph, x: Optional[int], steps: Sequence[Step], source: Optional[int]) -> Optional[int]:
    """Chain ``steps`` from node ``x`` and return the last node. ``x is None`` means "no input path yet"
    (the decoder before its first cross-attention): steps are left out until a ``source`` layer is met."""
    for step in steps:
        if isinstance(step, Layer):
            preds = [p for p in (x, source if step.source else None) if p is not None]
            if not preds:
                continue
            node = g.add_layer(step.name, step.width, step.nonlinear, step.cost)
            for p in preds:
                g.add_edge(p, node)
            x = node
        else:
            ends = [_add_steps(g, x, step.branch, source), _add_steps(g, x, step.skip, source)]
            ends = [e for e in ends if e is not None]
            if not ends:
                continue
            x = g.add_node(step.name)
            for e in ends:
                g.add_edge(e, x)
    return x


def build(encoder: Sequence[Step], decoder: Optional[Sequence[Step]] = None) -> PathGraph:
    """The graph of a chain of steps from the input; with ``decoder``, the encoder's last node feeds the
    decoder's ``source`` layers and the decoder's last node is the output."""
    g = PathGraph()
    out = _add_steps(g, g.input, encoder, None)
    if decoder is not None:
        out = _add_steps(g, None, decoder, out)
        if out is None:
            raise ValueError("No decoder layer takes the encoder output (no cross-attention found).")
    g.set_output(out)
    return g


# --------------------------------------------------------------------------------------------- helpers
_NORM_NAME = re.compile(r"(Layer|Rms|RMS)Norm")


def _is_norm(module: nn.Module) -> bool:
    """LayerNorm/RMSNorm-like modules: ungated nonlinearities (BatchNorm is linear at inference)."""
    return isinstance(module, nn.LayerNorm) or bool(_NORM_NAME.search(type(module).__name__))


def _count_norms(*modules: Optional[nn.Module]) -> int:
    return sum(_is_norm(m) for module in modules if module is not None for m in module.modules())


def _in_width(module: nn.Module) -> int:
    """Input channels of a Linear or a convolution (the unit count feeding an output projection)."""
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def _site(name: str, sites: Sites, width: Optional[int] = None, cost: float = 0.0) -> Layer:
    """The layer node of an activation site: its gated counts, or, for a site excluded from gating,
    ``width`` units counted 0 plus the ungated ``cost``."""
    if name in sites:
        units, nonlinear = sites[name]
        return Layer(name, units, nonlinear)
    if width is None:
        raise NotImplementedError(f"Activation {name!r} is not gated; this path graph needs it gated.")
    return Layer(name, width, 0, cost)


def _attention(name: str, width: int, cost: float, source: bool = False) -> Layer:
    """An attention sub-block: one linear layer of its value channels; its softmax costs ``cost``."""
    return Layer(name, width, 0, cost, source)


def _transformer_stack(
    layers: Sequence[Sequence[Layer]], pre_norm: bool, cost: float, first: Sequence[Layer] = (),
    last: Sequence[Layer] = (),
) -> list[Step]:
    """Residual sub-blocks around each node of each layer, with one norm per sub-block on the branch
    (pre-LN) or after the merge (post-LN); ``first``/``last`` are stream nodes (embedding/final norms)."""
    steps: list[Step] = list(first)
    for layer in layers:
        for node in layer:
            norm = Layer(f"{node.name}:norm", cost=cost)
            merge = f"{node.name}:add"
            steps += [Residual(merge, (norm, node))] if pre_norm else [Residual(merge, (node,)), norm]
    return steps + list(last)


def _norm_nodes(norms: Sequence[Optional[nn.Module]], cost: float, names: Mapping[nn.Module, str]) -> list[Layer]:
    """One stream node per norm module that exists (is not None)."""
    return [Layer(names[norm], cost=cost) for norm in norms if norm is not None]


# --------------------------------------------------------------------------------------------- HF Transformers
def seq2seq_fc_graph(model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
    """Marian/BART/mBART/M2M100/Pegasus/FSMT encoder-decoders (``fc1 -> activation_fn -> fc2``)."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(f"Path graph of the decoder-only {type(model).__name__} is not supported yet.")
    names = _module_names(model)
    stacks = []
    for stack in (model.get_encoder(), model.get_decoder()):
        final = getattr(stack, "layer_norm", None)
        layers = []
        for layer in stack.layers:
            nodes = [_attention(names[layer.self_attn], layer.self_attn.out_proj.in_features, ungated_cost)]
            if hasattr(layer, "encoder_attn"):
                cross = layer.encoder_attn
                nodes.append(_attention(names[cross], cross.out_proj.in_features, ungated_cost, source=True))
            nodes.append(_site(f"{names[layer]}.activation_fn", sites, layer.fc2.in_features, ungated_cost))
            layers.append(nodes)
        first = _norm_nodes([getattr(stack, "layernorm_embedding", None)], ungated_cost, names)
        stacks.append(_transformer_stack(layers, final is not None, ungated_cost, first,
                                         _norm_nodes([final], ungated_cost, names)))
    return build(*stacks)


def t5_graph(model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
    """T5/mT5/UMT5/LongT5 (pre-LN; ``layer[-1]`` is the FFN, ``DenseReluDense.act`` its site); encoder-only too."""
    names = _module_names(model)
    stacks = []
    for stack in (model.encoder, getattr(model, "decoder", None)):
        if stack is None:
            continue
        layers = []
        for block in stack.block:
            *attention_layers, ff = block.layer
            nodes = []
            for i, sub in enumerate(attention_layers):  # [self-attention, cross-attention (decoder)]
                attn = next(c for c in sub.children() if hasattr(c, "o"))
                nodes.append(_attention(names[attn], attn.o.in_features, ungated_cost, source=i == 1))
            ffn = ff.DenseReluDense
            nodes.append(_site(f"{names[ffn]}.act", sites, ffn.wo.in_features, ungated_cost))
            layers.append(nodes)
        stacks.append(_transformer_stack(layers, True, ungated_cost,
                                         last=_norm_nodes([stack.final_layer_norm], ungated_cost, names)))
    return build(*stacks)


@dataclass(frozen=True)
class EncoderGraph:
    """Graph builder of an HF encoder-only family, from where the family keeps its parts (dotted paths).

    ``layers`` and the norms are relative to the base model, the rest relative to one layer.
    """

    layers: str
    attention: str
    attention_out: str
    site: str
    ffn_out: str
    pre_norm: bool
    embedding_norm: Optional[str] = None
    final_norm: Optional[str] = None

    def __call__(self, model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
        base = model.base_model
        names = _module_names(model)
        nodes = []
        for layer in base.get_submodule(self.layers):
            attn = layer.get_submodule(self.attention)
            nodes.append([
                _attention(names[attn], _in_width(layer.get_submodule(self.attention_out)), ungated_cost),
                _site(f"{names[layer]}.{self.site}", sites, _in_width(layer.get_submodule(self.ffn_out)), ungated_cost),
            ])
        first, last = ([] if path is None else _norm_nodes([base.get_submodule(path)], ungated_cost, names)
                       for path in (self.embedding_norm, self.final_norm))
        return build(_transformer_stack(nodes, self.pre_norm, ungated_cost, first, last))


bert_graph = EncoderGraph("encoder.layer", "attention", "attention.output.dense", "intermediate.intermediate_act_fn",
                          "output.dense", pre_norm=False, embedding_norm="embeddings.LayerNorm")
"""BERT-family encoders: post-LN, embedding LayerNorm."""
distilbert_graph = EncoderGraph("transformer.layer", "attention", "attention.out_lin", "ffn.activation", "ffn.lin2",
                                pre_norm=False, embedding_norm="embeddings.LayerNorm")
"""DistilBERT: post-LN, embedding LayerNorm."""
hf_vit_graph = EncoderGraph("layers", "attention", "attention.o_proj", "mlp.activation_fn", "mlp.fc2", pre_norm=True,
                            final_norm="layernorm")
"""HF ViT/DeiT (transformers >= 5 layout): pre-LN, final LayerNorm."""


# --------------------------------------------------------------------------------------------- timm Transformers
def timm_transformer_graph(model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
    """timm ViT/DeiT/EVA/Swin (attention + MLP blocks) and ConvNeXt (token-mixing conv + MLP blocks)."""
    names = _module_names(model)
    cost = ungated_cost

    def norm(name: str, *modules: Optional[nn.Module]) -> list[Layer]:
        count = _count_norms(*modules)
        return [Layer(f"{name}:norm", cost=count * cost)] if count else []

    def mlp(block: nn.Module) -> Layer:
        return _site(f"{names[block.mlp]}.act", sites, _in_width(block.mlp.fc2), cost)

    def visit(module: nn.Module) -> list[Step]:
        steps: list[Step] = []
        for child_name, child in module.named_children():
            if module is model and child_name == "head":
                continue
            if hasattr(child, "attn") and hasattr(child, "mlp"):
                attn = _attention(names[child.attn], child.attn.proj.in_features, cost)
                steps += [
                    Residual(f"{attn.name}:add", (*norm(attn.name, getattr(child, "norm1", None), child.attn), attn)),
                    Residual(f"{names[child.mlp]}:add",
                             (*norm(names[child.mlp], getattr(child, "norm2", None), child.mlp), mlp(child))),
                ]
            elif hasattr(child, "conv_dw") and hasattr(child, "mlp"):
                if not isinstance(getattr(child, "shortcut", nn.Identity()), nn.Identity):
                    raise NotImplementedError(f"ConvNeXt block {names[child]!r} with a projection shortcut")
                mixer = Layer(names[child.conv_dw], child.conv_dw.out_channels)
                steps.append(Residual(f"{names[child]}:add", (mixer, *norm(names[child], child), mlp(child))))
            elif _is_norm(child):
                steps.append(Layer(names[child], cost=cost))
            else:
                steps += visit(child)
        return steps

    return build(visit(model))


# --------------------------------------------------------------------------------------------- CNNs
_CNN_ACTIVATION_NAME = re.compile(r"act\d*|relu\d*")


def _check_cnn_fully_gated(model: nn.Module) -> None:
    """CNN graphs place the post-add activation by position, so every activation must be gated."""
    skip = None
    ungated = []
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(module, (GatedActivation, SharedGatedActivation)):
            skip = name + "."
        elif (not list(module.children()) and not isinstance(module, nn.Identity)
              and _CNN_ACTIVATION_NAME.fullmatch(name.rpartition(".")[2])):
            ungated.append(name)
    if ungated:
        raise NotImplementedError(
            f"Path graph of a partly gated CNN is not supported yet; not gated: {ungated[:5]}. Patch it with the "
            "family default (every activation gated)."
        )


def _is_resnet_block(module: nn.Module) -> bool:
    return type(module).__name__ in ("BasicBlock", "Bottleneck") and hasattr(module, "downsample")


def _cnn_steps(module: nn.Module, prefix: str, sites: Sites, cost: float) -> list[Step]:
    steps: list[Step] = []
    for name, child in module.named_children():
        full = prefix + name
        if isinstance(child, GatedActivation):
            steps.append(_site(full, sites))
        elif isinstance(child, SharedGatedActivation):
            steps += [_site(f"{full}.sites.{i}", sites) for i in range(len(child.sites))]
        elif name == "se" and not isinstance(child, nn.Identity):
            side = _cnn_steps(child, full + ".", sites, cost)
            steps.append(Residual(f"{full}:mul", (*side, Layer(f"{full}:gate", cost=cost))))
        elif _is_resnet_block(child):
            *branch, post = _cnn_steps(child, full + ".", sites, cost)  # the last activation follows the add
            down = child.downsample
            skip = () if down is None else (
                Layer(f"{full}.downsample", [m for m in down.modules() if isinstance(m, nn.Conv2d)][-1].out_channels),)
            steps += [Residual(f"{full}:add", tuple(branch), skip), post]
        elif hasattr(child, "has_skip"):
            block = _cnn_steps(child, full + ".", sites, cost)
            steps += [Residual(f"{full}:add", tuple(block))] if child.has_skip and block else block
        elif isinstance(child, nn.modules.pooling._MaxPoolNd):
            steps.append(Layer(full, cost=cost))
        else:
            steps += _cnn_steps(child, full + ".", sites, cost)
    return steps


def cnn_graph(model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
    """timm ResNet/EfficientNet/MobileNetV3 and torchvision ResNet."""
    _check_cnn_fully_gated(model)
    return build(_cnn_steps(model, "", sites, ungated_cost))


# --------------------------------------------------------------------------------------------- plain MLPs
_PASS_THROUGH = (nn.Dropout, nn.Identity, nn.Flatten, nn.modules.batchnorm._BatchNorm)


def mlp_graph(model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
    """A plain ``nn.Sequential`` of Linear layers and activations: the chain of its activation layers."""
    if not isinstance(model, nn.Sequential):
        raise NotImplementedError(f"Path graph not supported yet for {type(model).__name__}")
    steps, width = [], None
    for name, child in model.named_children():
        if isinstance(child, GatedActivation):
            steps.append(_site(name, sites))
        elif isinstance(child, nn.Linear):
            width = child.out_features
        elif _is_norm(child):
            steps.append(Layer(name, cost=ungated_cost))
        elif isinstance(child, _PASS_THROUGH):
            continue
        elif width is not None and not list(child.children()) and not list(child.parameters()):
            steps.append(Layer(name, width, 0, ungated_cost))  # an ungated elementwise activation
        else:
            raise NotImplementedError(
                f"Path graph not supported yet for {type(model).__name__} with a {type(child).__name__} at {name!r} "
                "(a plain MLP is an nn.Sequential of Linear layers and activations)"
            )
    return build(steps)


REFERENCE: dict[str, GraphBuilder] = {
    "seq2seq_fc": seq2seq_fc_graph, "t5": t5_graph, "bert": bert_graph, "distilbert": distilbert_graph,
    "hf_vit": hf_vit_graph, "timm_transformer": timm_transformer_graph, "timm_cnn": cnn_graph,
    "torchvision_resnet": cnn_graph, "generic": mlp_graph,
}


def reference_graph(model: nn.Module, sites: Sites, ungated_cost: float) -> PathGraph:
    """The hand-built graph of a patched model of one of the families."""
    return REFERENCE[find_family(model).name](model, sites, ungated_cost)
