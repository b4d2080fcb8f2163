"""Access control of `dlora serve`: the API key (vLLM's `--api-key` / `VLLM_API_KEY`).

With a key set, every request to a `/v1` route needs `Authorization: Bearer <key>`; without it
the answer is 401 in OpenAI's error shape. `/health` and `/metrics` stay open, as in vLLM. A
plain ASGI middleware (not Starlette's BaseHTTPMiddleware), so streaming responses and the
app's disconnect checks are untouched.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi.responses import JSONResponse

from .protocol import error_body

PROTECTED_PREFIX = "/v1"


class ApiKeyMiddleware:
    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return secrets.compare_digest(value.strip(), self.expected)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX)
                and scope.get("method") != "OPTIONS" and not self._authorized(scope)):
            body = error_body("Unauthorized: this server needs an API key "
                              "(header `Authorization: Bearer <key>`)", "AuthenticationError", 401)
            response = JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
