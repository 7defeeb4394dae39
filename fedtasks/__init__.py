"""Federated tasks: the data sets anytime-fl trains on."""
