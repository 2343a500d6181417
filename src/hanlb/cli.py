"""The ``hanlb`` command: run components, drive the lab, query running components."""

from __future__ import annotations

import click

from .lab.cli import lab


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hanlb")
def main() -> None:
    """hanlb: a highly available network load balancer."""


main.add_command(lab)


if __name__ == "__main__":
    main()
