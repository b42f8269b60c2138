"""Serve the agent on Samvad's WebSocket (and REST API).

    python -m examples.adk_agent.serve [--host 127.0.0.1] [--port 8080]

Configuration comes from the environment, as for ``samvad serve``: with
``FIRESTORE_EMULATOR_HOST`` or Google credentials set, sessions and history
are durable in Firestore; otherwise everything stays in memory.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from examples.adk_agent.agent import root_agent
from samvad.adk.app import create_agent_app
from samvad.config import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level)
    app = create_agent_app(root_agent, settings)
    uvicorn.run(app, host=args.host or settings.host, port=args.port or settings.port)


if __name__ == "__main__":
    main()
