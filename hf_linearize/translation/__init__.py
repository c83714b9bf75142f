"""Translation support for the recipes: parallel corpora, a shared tokenizer trained on them, BLEU/chrF."""
