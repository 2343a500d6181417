"""``hanlb lab ...`` (filled in by the lab module)."""

from __future__ import annotations

import click


@click.group()
def lab() -> None:
    """Build and drive the namespace lab."""
