"""Server-side aggregation of adapter and exit-head weights (numpy arrays only)."""
