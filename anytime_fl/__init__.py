"""anytime-fl: anytime early-exit adapters on a frozen ViT, trained with Flower."""
