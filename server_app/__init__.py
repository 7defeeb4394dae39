"""The Flower ServerApp of anytime-fl."""
