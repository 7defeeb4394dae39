"""What the ClientApp and ServerApp share at run time: the model and input
spec a run config describes, built once per process (`models`)."""
