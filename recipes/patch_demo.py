"""Offline demo: patch a Marian translation model and a timm ResNet, linearize half the units, print summaries."""

from __future__ import annotations

import timm
import torch
from transformers import MarianConfig, MarianMTModel

import hf_linearize as hl


def main() -> None:
    torch.manual_seed(0)
    marian = MarianMTModel(MarianConfig(vocab_size=1000, d_model=64, encoder_layers=3, decoder_layers=3,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256,
                                        decoder_ffn_dim=256, pad_token_id=0, decoder_start_token_id=0)).eval()
    resnet = timm.create_model("resnet18", pretrained=False).eval()
    for name, model in (("marian", marian), ("resnet18", resnet)):
        hl.patch_model(model)
        hl.set_linear(model, 0.5)
        print(f"\n== {name} ({hl.summary(model)['family']}) with half of every layer linearized ==")
        print(hl.summary(model))


if __name__ == "__main__":
    main()
