"""Data files shipped with anytime-fl: the offline pre-trained backbone."""
