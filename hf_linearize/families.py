"""Model families: where each family keeps its activation sites, in one table.

A :class:`FamilySpec` answers, for one layout of model, which modules are its FFN/MLP activation sites.
Folding needs no table: :mod:`hf_linearize.folding` finds each site's projections in the traced data flow.
The path graph of every model is traced from its own forward pass (:mod:`hf_linearize.traced_graph`), not kept
here.
Families that share a layout share a spec (Marian, BART, mBART, M2M100/NLLB, Pegasus, Blenderbot, PLBart
and FSMT all use ``fc1 -> activation_fn -> fc2``). A model that matches no spec falls back to
:data:`GENERIC`, which gates activation modules by type and behaviour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Union

import timm.layers
import torch
import transformers.activations as hf_act
from torch import nn

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


_NORM_NAME = re.compile(r"(Layer|Rms|RMS)Norm")


def is_norm(module: nn.Module) -> bool:
    """LayerNorm/RMSNorm/GroupNorm-like modules: ungated nonlinearities. torch's norm types, or a leaf module whose
    class name says so (``LlamaRMSNorm``, ``LayerNorm2d``); a container that only has the word in its name
    (wav2vec2's ``Wav2Vec2EncoderStableLayerNorm``) is not one. BatchNorm is linear at inference and is not one."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or (
        next(module.children(), None) is None and bool(_NORM_NAME.search(type(module).__name__)))


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
class FamilySpec:
    """One model layout.

    Attributes:
        name: the family's name, recorded in checkpoints.
        matches: predicate on the (unpatched) model.
        models: the models of the family, in words (README table).
        sites: where its FFN activation sites are, in words (README table).
        layouts: the site layouts (:class:`~hf_linearize.patching.SiteLayout`: ``elementwise``, ``glu``,
            ``packed-glu``, ``expert-packed-glu``) its models have; the tests patch a model of each and check that the
            layouts found are exactly these, so the README's table says which layouts are verified.
        target_modules: default selector of the activation sites (regex, full match on the module name),
            or None to gate every activation module by type.
        mean_task_loss: the model's ``forward`` returns a plain mean loss and ignores ``num_items_in_batch``
            although it takes ``**kwargs`` (transformers 5 would then mis-scale it under gradient accumulation
            and DDP; `LinearizeTrainer` tells the Trainer so).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    models: str
    sites: str
    layouts: tuple[str, ...] = ("elementwise",)
    target_modules: Selector = None
    mean_task_loss: bool = False


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


SEQ2SEQ_FC = FamilySpec(
    name="seq2seq_fc",
    models="Marian, BART, mBART, M2M100/NLLB, Pegasus, Blenderbot, PLBart, FSMT, MVP",
    sites="`(encoder|decoder).layers.N.activation_fn`",
    matches=_hf_model_type(
        "marian", "bart", "mbart", "m2m_100", "pegasus", "blenderbot", "blenderbot-small", "plbart", "fsmt", "mvp"
    ),
    target_modules=r".*(encoder|decoder)\.layers\.\d+\.activation_fn",
    mean_task_loss=True,
)
T5 = FamilySpec(
    name="t5",
    models="T5 (ReLU), T5 v1.1 and mT5 (gated GELU), UMT5, LongT5",
    sites="`DenseReluDense.act`",
    layouts=("elementwise", "glu"),
    matches=_hf_model_type("t5", "mt5", "umt5", "longt5"),
    target_modules=r".*\.DenseReluDense\.act",
    mean_task_loss=True,
)
BERT = FamilySpec(
    name="bert",
    models="BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, ERNIE, data2vec-text",
    sites="`intermediate.intermediate_act_fn` (not the pooler tanh or the MLM head)",
    matches=_hf_model_type("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text"),
    target_modules=r".*\.intermediate\.intermediate_act_fn",
)
DISTILBERT = FamilySpec(
    name="distilbert",
    models="DistilBERT",
    sites="`ffn.activation`",
    matches=_hf_model_type("distilbert"),
    target_modules=r".*\.ffn\.activation",
)
HF_VIT = FamilySpec(
    name="hf_vit",
    models="HF ViT, DeiT",
    sites="`layers.N.mlp.activation_fn`",
    matches=_hf_model_type("vit", "deit"),
    target_modules=r"(.*\.)?layers\.\d+\.mlp\.activation_fn",
)
TIMM_TRANSFORMER = FamilySpec(
    name="timm_transformer",
    models="timm ViT/DeiT, Swin, EVA, ConvNeXt",
    sites="`*.mlp.act` (`Mlp`, `GluMlp`, `SwiGLU`, `SwiGLUPacked`, `ConvMlp`)",
    layouts=("elementwise", "glu", "packed-glu"),
    matches=_library_class("timm", "VisionTransformer", "SwinTransformer", "Eva", "ConvNeXt"),
    target_modules=r".*\.mlp\.act",
)
TIMM_CNN = FamilySpec(
    name="timm_cnn",
    models="timm ResNet, EfficientNet, MobileNetV3",
    sites="every activation module, stem and squeeze-excite included (in-place ReLUs are made out-of-place inside "
          "the gate and restored by `unpatch`)",
    matches=_library_class("timm", "ResNet", "EfficientNet", "MobileNetV3"),
)
TORCHVISION_RESNET = FamilySpec(
    name="torchvision_resnet",
    models="torchvision ResNet",
    sites="every activation module; the shared `relu` gets one gate per call site",
    matches=_library_class("torchvision", "ResNet"),
)
GENERIC = FamilySpec(
    name="generic",
    models="anything else, e.g. LLaMA, Mistral, Qwen2/3, Gemma 1/2, Phi, Phi-3, GPT-2, GPT-J, GPT-NeoX, OPT, Falcon, "
           "BLOOM, Mixtral, Qwen2-MoE, DeBERTa-v2, ALBERT, CLIP, Whisper, HF ConvNeXt/Swin/DINOv2, timm RegNet, "
           "your own `nn.Module`",
    sites="every activation module by type (ReLU, GELU, SiLU, hard-swish, Mish, ... from torch, timm and "
          "`transformers.ACT2FN`) or behaviour (BLOOM's `BloomGelu`), not below a task head "
          "(`families.HEAD_MODULES`) unless targeted",
    layouts=("elementwise", "glu", "packed-glu", "expert-packed-glu"),
    matches=lambda model: True,
)

FAMILIES: tuple[FamilySpec, ...] = (
    SEQ2SEQ_FC, T5, BERT, DISTILBERT, HF_VIT, TIMM_TRANSFORMER, TIMM_CNN, TORCHVISION_RESNET, GENERIC
)
"""The registry, most specific first; :data:`GENERIC` is the catch-all."""


def markdown_table() -> str:
    """The README's table of families (family, models, sites, verified layouts), generated from :data:`FAMILIES`;
    a test keeps the README equal to it."""
    rows = ["| family | models | FFN sites | layouts (verified) |", "|---|---|---|---|"]
    for spec in FAMILIES:
        sites = spec.sites.replace("|", "\\|")
        rows.append(f"| `{spec.name}` | {spec.models} | {sites} | {', '.join(spec.layouts)} |")
    return "\n".join(rows)


def find_family(model: nn.Module) -> FamilySpec:
    """The first family in :data:`FAMILIES` whose predicate accepts ``model``."""
    return next(spec for spec in FAMILIES if spec.matches(model))


def family_by_name(name: str) -> FamilySpec:
    for spec in FAMILIES:
        if spec.name == name:
            return spec
    raise KeyError(f"Unknown model family {name!r}; known families: {[f.name for f in FAMILIES]}.")
