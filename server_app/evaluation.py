"""Centralised evaluation of the global adapters at every exit."""

from __future__ import annotations

from torch.utils.data import DataLoader

from adapters.state import set_state
from adapters.training import evaluate


class ServerEvaluator:
    """Test accuracy and loss of every exit for a set of global adapter arrays.

    Args:
        model: the AnytimeViT whose adapters and heads are overwritten with
            each call's arrays (the backbone stays as built).
        test_set: the server's test set, already brought to the backbone's input.
        batch_size: evaluation batch size (`eval-batch-size`).
    """

    def __init__(self, model, test_set, batch_size: int):
        self.model = model
        self.loader = DataLoader(test_set, batch_size=batch_size)

    def __call__(self, arrays) -> dict:
        set_state(self.model, arrays)
        res = evaluate(self.model, self.loader)
        return {
            "accuracy": [round(a, 4) for a in res["accuracy"]],
            "loss": [round(x, 4) for x in res["loss"]],
            "num-examples": res["num_examples"],
        }
