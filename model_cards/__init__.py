"""Model-card templates, installed as hf_linearize.model_cards."""
