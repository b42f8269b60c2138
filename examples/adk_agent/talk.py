"""Talk to the served agent from a terminal, streaming its replies.

    python -m examples.adk_agent.talk [--url ws://127.0.0.1:8080/ws] [--user demo]

Type a message and press Enter; Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from samvad.client import SamvadClient


async def talk(url: str, user_id: str) -> None:
    async with await SamvadClient.connect(url, user_id=user_id) as client:
        print(f"session {client.session_id}; Ctrl-D to leave", file=sys.stderr)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            exchange = await client.ask(line.strip())
            print(exchange.reply.text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--user", default="demo")
    args = parser.parse_args()
    asyncio.run(talk(args.url, args.user))


if __name__ == "__main__":
    main()
