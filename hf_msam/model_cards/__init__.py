"""Model card templates shipped as package data (``msam_model_card.md``)."""
