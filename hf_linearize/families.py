"""Model families: where each family keeps its activation sites, what its path graph is and how its linear
units fold away, in one table.

A :class:`FamilySpec` answers, for one layout of model, which modules are its FFN/MLP activation sites,
how to build its path graph (the builders and the graph of each family are in :mod:`hf_linearize.graphs`), and
which projection feeds each site and which reads it (:class:`FoldRule`, used by :mod:`hf_linearize.folding`).
Families that share a layout share a spec (Marian, BART, mBART, M2M100/NLLB, Pegasus, Blenderbot, PLBart
and FSMT all use ``fc1 -> activation_fn -> fc2``). A model that matches no spec falls back to
:data:`GENERIC`, which gates activation modules by type and has a path graph for plain MLP stacks only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

import timm.layers
import torch
import transformers.activations as hf_act
from torch import nn

from . import graphs
from .gates import GateKind

Selector = Union[str, list[str], None]

# Activation types gated when no explicit target is given. Saturating "gates" (sigmoid, tanh, hard-sigmoid),
# softmax and the identity are not FFN nonlinearities and are left alone unless targeted explicitly.
NOT_GATED_BY_DEFAULT: tuple[type, ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardsigmoid,
    nn.Softmax,
    nn.Identity,
    nn.GLU,
    hf_act.LinearActivation,
    timm.layers.activations.Sigmoid,
    timm.layers.activations.Tanh,
    timm.layers.activations.HardSigmoid,
)

_TORCH_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.PReLU, nn.RReLU, nn.Hardtanh,
)
_TIMM_ACTIVATIONS: tuple[type, ...] = (
    timm.layers.activations.Swish, timm.layers.activations.Mish, timm.layers.activations.HardSwish,
    timm.layers.activations.HardMish, timm.layers.activations.PReLU, timm.layers.activations.GELU,
    timm.layers.activations.GELUTanh, timm.layers.activations.QuickGELU,
)


def _hf_activation_classes() -> tuple[type, ...]:
    classes = []
    for entry in hf_act.ACT2CLS.values():
        cls = entry[0] if isinstance(entry, tuple) else entry
        classes.append(cls)
    return tuple(classes)


ACTIVATION_TYPES: tuple[type, ...] = tuple(
    c for c in {*_TORCH_ACTIVATIONS, *_TIMM_ACTIVATIONS, *_hf_activation_classes()} if not issubclass(c, NOT_GATED_BY_DEFAULT)
)
"""Module types that the generic rule gates: ReLU/GELU/SiLU/... from torch, timm and ``transformers.ACT2CLS``."""

_ACTIVATION_NAME = re.compile(r"(act|relu|gelu|silu|swish|mish|elu|tanh|sigmoid|softmax|softplus|glu)", re.I)


def is_activation_like(module: nn.Module) -> bool:
    """True for leaf modules that look like activations (by type or by class name); used in error messages."""
    if isinstance(module, ACTIVATION_TYPES + NOT_GATED_BY_DEFAULT):
        return not isinstance(module, nn.Identity)
    return not list(module.children()) and bool(_ACTIVATION_NAME.search(type(module).__name__))


HEAD_MODULES: tuple[str, ...] = (
    "cls", "lm_head", "lm_predictions", "pooler", "classifier", "pre_classifier", "score", "qa_outputs", "head",
    "heads", "pre_logits",
)
"""Names of task-head modules. An activation below one (e.g. DeBERTa-v2's MLM transform) is not an FFN site by
default; name it in ``target_modules`` to gate it."""


def in_head(name: str) -> bool:
    """True when a component of the dotted module ``name`` is one of :data:`HEAD_MODULES`."""
    return any(part in HEAD_MODULES for part in name.split("."))


@torch.no_grad()
def behaves_like_activation(module: nn.Module) -> bool:
    """True for a parameter-free leaf module that acts like an FFN activation, whatever its class (BLOOM's
    ``BloomGelu``): on a probe vector it is elementwise (each output depends on its own input only), nonlinear, and
    unbounded like the identity for large inputs (``f(1000) / 1000`` within 10% of 1, as ReLU/GELU/SiLU). Sigmoid,
    tanh, softmax, dropout and the identity fail the test. A module that raises on a 1-D float tensor is not one.
    """
    if list(module.children()) or next(module.parameters(), None) is not None:
        return False
    x = torch.linspace(-4.0, 4.0, 33)
    was_training = module.training
    module.train(False)
    try:
        y, flipped, doubled, large = (module(t.clone()) for t in (x, x.flip(0), 2 * x, torch.tensor([1000.0])))
    except Exception:
        return False
    finally:
        module.train(was_training)
    if not all(isinstance(t, torch.Tensor) and t.shape == s.shape and bool(torch.isfinite(t).all())
               for t, s in ((y, x), (flipped, x), (doubled, x), (large, torch.empty(1)))):
        return False
    elementwise = torch.allclose(flipped, y.flip(0), atol=1e-6)
    nonlinear = not torch.allclose(doubled, 2 * y, atol=1e-3)
    return elementwise and nonlinear and abs(float(large[0]) / 1000.0 - 1.0) < 0.1


@dataclass(frozen=True)
class FoldRule:
    """Which projections feed a gated FFN site and which reads it; :func:`hf_linearize.fold` uses the first rule
    of the family that fits a site. Paths are dotted, relative to the FFN's *owner*: the module whose name is the
    site's name minus ``site``.

    Attributes:
        site: path of the activation (e.g. ``"activation_fn"``, ``"intermediate.intermediate_act_fn"``).
        fc_in: the ``nn.Linear`` (or 1x1 ``nn.Conv2d``) feeding the site; for a GLU site its gate projection ``u``.
        fc_out: the projection reading the FFN's hidden layer.
        glu: the site is the gate of a gated FFN ``fc_out(act(u) * v)``. The owner must be exactly that FFN (it is
            replaced as a whole). A plain site is ``fc_out(act(fc_in(x)))``, called by the owner as three separate
            modules (they are replaced one by one, so the owner keeps its own forward).
        fc_value: GLU only: the value projection ``v``; None when ``fc_in`` packs ``[u, v]`` halves.
        gate_half: GLU with packed ``fc_in`` only: owner -> which half (0 or 1) of ``fc_in``'s output is ``u``.
        identity: paths that must be ``nn.Identity`` for the rule to hold (e.g. an optional norm inside timm MLPs).
    """

    site: str
    fc_in: str
    fc_out: str
    glu: bool = False
    fc_value: Optional[str] = None
    gate_half: Optional[Callable[[nn.Module], int]] = None
    identity: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    """One model layout.

    Attributes:
        name: the family's name, recorded in checkpoints.
        matches: predicate on the (unpatched) model.
        graph: builds the path graph of a patched model of this layout (see :mod:`hf_linearize.graphs`);
            raises ``NotImplementedError`` for a model of the family whose layout it cannot read.
        target_modules: default selector of the activation sites (regex, full match on the module name),
            or None to gate every activation module by type.
        mean_task_loss: the model's ``forward`` returns a plain mean loss and ignores ``num_items_in_batch``
            although it takes ``**kwargs`` (transformers 5 would then mis-scale it under gradient accumulation
            and DDP; `LinearizeTrainer` tells the Trainer so).
        fold_rules: how its FFN sites fold (:class:`FoldRule`, first fit wins); a site no rule fits stays gated.
        fold_note: why sites stay gated when folded, for families without (complete) fold rules.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    graph: graphs.GraphBuilder
    target_modules: Selector = None
    mean_task_loss: bool = False
    fold_rules: tuple[FoldRule, ...] = ()
    fold_note: str = "no fold rule fits this site"


def _hf_model_type(*model_types: str) -> Callable[[nn.Module], bool]:
    def match(model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in model_types

    return match


def _library_class(library: str, *class_names: str) -> Callable[[nn.Module], bool]:
    """Match models of ``library`` (e.g. ``"timm"``) by class name, without importing the library."""

    def match(model: nn.Module) -> bool:
        return type(model).__module__.startswith(library + ".") and any(
            cls.__name__ in class_names for cls in type(model).__mro__
        )

    return match


# Why CNN sites stay gated. A linear activation layer between two convolutions (BatchNorm folded in) could merge
# them, but in the supported CNNs no merge pays off or is exact: k x k o k x k grows the kernel (3x3 o 3x3 -> 5x5,
# 25 vs 18 MACs per channel pair in ResNet BasicBlocks); 1x1 o k x k into a ResNet bottleneck's thin 3x3 costs
# 9*4c*c = 36c^2 against 4c^2 + 9c^2 (and a k x k after a biased 1x1 is inexact at zero-padded borders); in
# EfficientNet/MobileNet the neighbour is a depthwise conv (a merge makes it dense) or the squeeze-excite product.
_CNN_FOLD_NOTE = "CNN activations stay gated: no conv merge pays off in ResNet/EfficientNet/MobileNet blocks"

SEQ2SEQ_FC = FamilySpec(
    name="seq2seq_fc",
    matches=_hf_model_type(
        "marian", "bart", "mbart", "m2m_100", "pegasus", "blenderbot", "blenderbot-small", "plbart", "fsmt", "mvp"
    ),
    target_modules=r".*(encoder|decoder)\.layers\.\d+\.activation_fn",
    graph=graphs.seq2seq_fc_graph,
    mean_task_loss=True,
    fold_rules=(FoldRule(site="activation_fn", fc_in="fc1", fc_out="fc2"),),
)
T5 = FamilySpec(
    name="t5",
    matches=_hf_model_type("t5", "mt5", "umt5", "longt5"),
    target_modules=r".*\.DenseReluDense\.act",
    graph=graphs.t5_graph,
    mean_task_loss=True,
    fold_rules=(
        FoldRule(site="act", fc_in="wi_0", fc_value="wi_1", fc_out="wo", glu=True),  # T5 v1.1, mT5
        FoldRule(site="act", fc_in="wi", fc_out="wo"),
    ),
)
BERT = FamilySpec(
    name="bert",
    matches=_hf_model_type("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text"),
    target_modules=r".*\.intermediate\.intermediate_act_fn",
    graph=graphs.bert_graph,
    fold_rules=(FoldRule(site="intermediate.intermediate_act_fn", fc_in="intermediate.dense", fc_out="output.dense"),),
)
DISTILBERT = FamilySpec(
    name="distilbert",
    matches=_hf_model_type("distilbert"),
    target_modules=r".*\.ffn\.activation",
    graph=graphs.distilbert_graph,
    fold_rules=(FoldRule(site="activation", fc_in="lin1", fc_out="lin2"),),
)
HF_VIT = FamilySpec(
    name="hf_vit",
    matches=_hf_model_type("vit", "deit"),
    target_modules=r"(.*\.)?layers\.\d+\.mlp\.activation_fn",
    graph=graphs.hf_vit_graph,
    fold_rules=(FoldRule(site="activation_fn", fc_in="fc1", fc_out="fc2"),),
)
TIMM_TRANSFORMER = FamilySpec(
    name="timm_transformer",
    matches=_library_class("timm", "VisionTransformer", "SwinTransformer", "Eva", "ConvNeXt"),
    target_modules=r".*\.mlp\.act",
    graph=graphs.timm_transformer_graph,
    fold_rules=(
        FoldRule(site="act", fc_in="fc1_g", fc_value="fc1_x", fc_out="fc2", glu=True, identity=("norm",)),  # SwiGLU
        FoldRule(site="act", fc_in="fc1", fc_out="fc2", glu=True, identity=("norm",),  # GluMlp, SwiGLUPacked
                 gate_half=lambda mlp: int(mlp.gate_last)),
        FoldRule(site="act", fc_in="fc1", fc_out="fc2", identity=("norm",)),  # Mlp (Linear), ConvMlp (1x1 conv)
    ),
    fold_note="an MLP with a norm layer between its projections cannot fold",
)
TIMM_CNN = FamilySpec(
    name="timm_cnn",
    matches=_library_class("timm", "ResNet", "EfficientNet", "MobileNetV3"),
    graph=graphs.cnn_graph,
    fold_note=_CNN_FOLD_NOTE,
)
TORCHVISION_RESNET = FamilySpec(
    name="torchvision_resnet",
    matches=_library_class("torchvision", "ResNet"),
    graph=graphs.cnn_graph,
    fold_note=_CNN_FOLD_NOTE,
)
GENERIC = FamilySpec(
    name="generic",
    matches=lambda model: True,
    graph=graphs.mlp_graph,
    fold_rules=(FoldRule(site="act_fn", fc_in="gate_proj", fc_value="up_proj", fc_out="down_proj", glu=True),),  # LLaMA
)

FAMILIES: tuple[FamilySpec, ...] = (
    SEQ2SEQ_FC, T5, BERT, DISTILBERT, HF_VIT, TIMM_TRANSFORMER, TIMM_CNN, TORCHVISION_RESNET, GENERIC
)
"""The registry, most specific first; :data:`GENERIC` is the catch-all."""


def find_family(model: nn.Module) -> FamilySpec:
    """The first family in :data:`FAMILIES` whose predicate accepts ``model``."""
    return next(spec for spec in FAMILIES if spec.matches(model))


def family_by_name(name: str) -> FamilySpec:
    for spec in FAMILIES:
        if spec.name == name:
            return spec
    raise KeyError(f"Unknown model family {name!r}; known families: {[f.name for f in FAMILIES]}.")
