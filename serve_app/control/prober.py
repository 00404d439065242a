"""Active checks the health actor makes of each replica: /health and /v1/models.

(Load scrapes of /metrics run apart, on their own pool: `load_scraper`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp



@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    error: str = ""
    models: tuple[str, ...] | None = None  # None: not asked, or could not tell


class Prober:
    def __init__(self, session: aiohttp.ClientSession, timeout_s: float, upstream_key: bytes | None = None) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # vLLM's --api-key guards /v1/* (not /health): the models probe sends it.
        self._auth = {"authorization": "Bearer " + upstream_key.decode()} if upstream_key else {}

    async def probe(self, url: str, want_models: bool) -> ProbeResult:
        try:
            async with self._session.get(url + "/health", timeout=self._timeout) as resp:
                await resp.read()
                if resp.status != 200:
                    return ProbeResult(False, f"/health answered {resp.status}")
            if not want_models:
                return ProbeResult(True)
            async with self._session.get(url + "/v1/models", timeout=self._timeout, headers=self._auth) as resp:
                if resp.status != 200:
                    return ProbeResult(True)
                payload = await resp.json(content_type=None)
            models = tuple(
                entry["id"] for entry in payload.get("data", ()) if isinstance(entry, dict) and entry.get("id")
            )
            return ProbeResult(True, models=models or None)
        except aiohttp.ClientConnectorError as exc:
            return ProbeResult(False, f"connection refused ({exc.os_error})")
        except TimeoutError:
            return ProbeResult(False, "health probe timed out")
        except (aiohttp.ClientError, ConnectionError, ValueError) as exc:
            return ProbeResult(False, f"{type(exc).__name__}: {exc}")
