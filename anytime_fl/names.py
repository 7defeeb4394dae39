"""Whether another installed distribution owns one of this project's import names.

The project's packages are top-level (`core`, `adapters`, `runtime`,
`strategies`, ...: the layout of the design and of Flower's app, whose
components are `server_app.app:app` and `client_app.app:app`), and PyPI has
distributions of the same names, AdapterHub's `adapters` among them. Python
has one namespace of top-level modules per environment: pip writes one
package's files over the other's, and an editable install's finder comes
after site-packages, so the other `adapters` is the one imported. Hence
anytime-fl wants an environment of its own; scripts/install.sh runs this
check (`python -m anytime_fl.names`) and stops on a clash.
"""

from __future__ import annotations

import sys
from importlib.metadata import packages_distributions

DISTRIBUTION = "anytime-fl"
PACKAGES = (
    "core",
    "adapters",
    "fedtasks",
    "runtime",
    "strategies",
    "client_app",
    "server_app",
    "anytime_fl",
    "anytime_assets",
)


def clashes() -> dict[str, list[str]]:
    """Our import names that other installed distributions also provide, with those distributions."""
    owners = packages_distributions()
    found = {name: sorted({d for d in owners.get(name, []) if d != DISTRIBUTION}) for name in PACKAGES}
    return {name: dists for name, dists in found.items() if dists}


def main(argv: list[str] | None = None) -> int:
    found = clashes()
    if not found:
        return 0
    named = "; ".join(f"'{name}' also from {', '.join(dists)}" for name, dists in found.items())
    print(
        f"anytime-fl: import names taken by other distributions ({named}): install anytime-fl into a virtual "
        "environment of its own (python3 -m venv .venv && . .venv/bin/activate)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
