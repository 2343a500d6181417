"""``python -m hanlb.switch --config cluster.toml``: run the LB-aware switch.

Run it in the router's network namespace (``ip netns exec ROUTER python -m
hanlb.switch -c cluster.toml``). SIGTERM or SIGINT stops it and removes the
next hops, group and VIP routes it installed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from ..config import load_config
from .service import SwitchService


async def _run(config_path: str) -> None:
    service = SwitchService(load_config(config_path))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hanlb.switch", description=__doc__)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(_run(args.config))


if __name__ == "__main__":
    main()
