"""A fake Flower Grid for running `server_app.app.run` in-process in tests.

It answers `send_and_receive` by calling the real ClientApp handlers
(`client_app.app.train` / `evaluate_exits`) with hand-built Flower Contexts,
one per node, whose state persists across rounds as a SuperNode's would
(`tests.localgrid.LocalGrid` does the delivery). On top of it the fake
grid records every message it delivered, can re-raise client exceptions
instead of turning them into error replies (so a test fails where the bug
is), and can simulate Ctrl-C by raising KeyboardInterrupt when a given
training round starts.

Use the `fake_grid` fixture (registered in tests/conftest.py):

    def test_x(fake_grid, tmp_path):
        grid = fake_grid(num_nodes=4, run_config=cfg)
        run(grid, cfg)
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType

from tests.localgrid import LocalGrid


class FakeGrid(LocalGrid):
    def __init__(
        self,
        num_nodes: int,
        run_config: dict,
        *,
        node_configs: list[dict] | None = None,
        interrupt_at_round: int | None = None,
        raise_errors: bool = True,
    ):
        super().__init__(num_nodes, run_config, node_configs)
        self.interrupt_at_round = interrupt_at_round
        self.raise_errors = raise_errors
        self.delivered: list[dict] = []  # one entry per message: type, node, round, config, array names
        self.errors: list[BaseException] = []
        self.handlers = {kind: self._recording(fn) for kind, fn in self.handlers.items()}

    def _recording(self, handler):
        def call(msg: Message, context) -> Message:
            try:
                return handler(msg, context)
            except Exception as err:
                self.errors.append(err)
                raise

        return call

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            config = dict(msg.content.config_records.get("config", {}))
            if (
                msg.metadata.message_type == MessageType.TRAIN
                and self.interrupt_at_round is not None
                and config.get("server-round") == self.interrupt_at_round
            ):
                raise KeyboardInterrupt(f"simulated Ctrl-C at the start of round {self.interrupt_at_round}")
            self.delivered.append(
                {
                    "type": msg.metadata.message_type,
                    "node": msg.metadata.dst_node_id,
                    "round": config.get("server-round"),
                    "config": config,
                    "arrays": sorted(msg.content.array_records.get("arrays", {}).keys()),
                }
            )
        before = len(self.errors)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if self.raise_errors and len(self.errors) > before:
            raise self.errors[before]
        return replies

    def rounds(self, message_type: str = MessageType.TRAIN) -> list[int]:
        """Server rounds that sent at least one message of this type, in order."""
        return sorted({d["round"] for d in self.delivered if d["type"] == message_type})


@pytest.fixture
def fake_grid():
    """Factory: fake_grid(num_nodes, run_config, **options) -> FakeGrid."""
    return FakeGrid
