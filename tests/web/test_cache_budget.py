"""The view caches stay within SAMVAD_CACHE_MAX_BYTES whatever the number of
users, through a real server, and an evicted view reads back whole."""

from __future__ import annotations

import httpx

from samvad.config import Settings
from samvad.web.app import create_app
from tests.support.server import live_server

BUDGET = 64 * 1024
USERS = 300
CONTENT = "Which documents do I need for a home loan application, and how long is it? " * 3


def cache_bytes(metrics: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("samvad_cache_bytes{"):
            name = line.split('cache="', 1)[1].split('"', 1)[0]
            found[name] = float(line.rsplit(" ", 1)[1])
    return found


async def test_a_small_cache_budget_holds_and_evicted_users_read_back_whole() -> None:
    settings = Settings(store="memory", cache_max_bytes=BUDGET)
    app = create_app(settings)
    async with live_server(app) as server, httpx.AsyncClient(base_url=server.url) as http:
        for i in range(USERS):
            state = await http.post(f"/api/session/b{i}/state", json={"language": "en", "n": i})
            assert state.status_code == 200
            message = await http.post(
                f"/api/session/b{i}/history", json={"role": "user", "content": f"{i} {CONTENT}"}
            )
            assert message.status_code == 200
        sizes = cache_bytes((await http.get("/metrics")).text)
        assert set(sizes) == {"states", "profiles", "sessions"}
        assert sizes["profiles"] <= BUDGET // 2
        assert sizes["states"] <= BUDGET // 4
        assert sum(sizes.values()) <= BUDGET
        entries = server.services.persistence.cache_stats()
        assert 0 < entries["profiles"].entries < USERS, "the budget evicted some users"
        for i in range(USERS):
            profile = (await http.get(f"/api/session/b{i}/profile")).json()["profile"]
            assert [m["content"] for m in profile["conversationHistory"]] == [f"{i} {CONTENT}"]
            state = (await http.get(f"/api/session/b{i}/state")).json()["state"]
            assert (state["language"], state["n"]) == ("en", i)
        sizes = cache_bytes((await http.get("/metrics")).text)
        assert sum(sizes.values()) <= BUDGET
