"""The Flower ClientApp of anytime-fl."""
