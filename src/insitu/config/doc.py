"""The flag tables of docs/cli.md, generated from the schemas so the documentation cannot drift.

``python -m insitu.config.doc docs/cli.md`` rewrites the text between each ``<!-- flags:NAME -->`` and
``<!-- /flags:NAME -->`` marker pair; with ``--check`` it only reports (exit 1) whether the file is
current. ``tests/test_config.py`` runs the check.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path


def tables() -> dict[str, Callable[[], str]]:
    """Marker name -> function producing that table (imported lazily: the schemas pull in torch)."""

    def simulate() -> str:
        from insitu.config.cli import markdown_table
        from insitu.simulation import SimulationConfig

        return markdown_table(SimulationConfig)

    def server() -> str:
        from insitu.cli.deploy import DEPLOYED_SETTINGS, SERVER_ALIASES, SERVER_HELP
        from insitu.config.cli import markdown_table
        from insitu.net.server import ServerSettings
        from insitu.simulation import SimulationConfig

        return (markdown_table(ServerSettings) + "\n\nand these simulation settings (same keys, at the top level or "
                "under `[simulate]`):\n\n" + markdown_table(SimulationConfig, DEPLOYED_SETTINGS, SERVER_ALIASES, SERVER_HELP))

    def client() -> str:
        from insitu.config.cli import markdown_table
        from insitu.net.client import ClientSettings

        return markdown_table(ClientSettings)

    return {"simulate": simulate, "server": server, "client": client}


def render(text: str) -> str:
    """``text`` with every marked table regenerated; a marker without its closing pair is an error."""
    for name, make in tables().items():
        pattern = re.compile(rf"(<!-- flags:{name} -->\n)(?:.*?\n)?(<!-- /flags:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"no '<!-- flags:{name} -->' ... '<!-- /flags:{name} -->' block to fill")
        table = make()
        text = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)  # noqa: B023 (called at once)
    return text


def main(argv: list[str]) -> int:
    """Rewrite (or, with --check, verify) the flag tables in the given Markdown file."""
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    if len(paths) != 1:
        print("usage: python -m insitu.config.doc [--check] docs/cli.md", file=sys.stderr)
        return 2
    path = Path(paths[0])
    old = path.read_text()
    new = render(old)
    if check:
        if new != old:
            print(f"{path} is out of date: run python -m insitu.config.doc {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
