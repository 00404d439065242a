"""Error responses in OpenAI's shape, which every OpenAI SDK parses.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`
"""

from __future__ import annotations

import json

from starlette.responses import Response

REASON_HEADER = "x-gateway-reason"


class GatewayError(Exception):
    """An error the gateway answers itself; raised anywhere on the request path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self, headers: dict[str, str] | None = None) -> Response:
        out = {REASON_HEADER: self.code, **(headers or {})}
        if self.retry_after_s is not None:
            out["retry-after"] = str(self.retry_after_s)
        return Response(self.body(), status_code=self.status, media_type="application/json", headers=out)


def error_body(message: str, type: str, code: str | int | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


def stream_error_event(message: str, code: str) -> bytes:
    """The SSE error event that ends a stream the gateway cannot finish, then [DONE]."""
    return b"data: " + error_body(message, "upstream_error", code) + b"\n\ndata: [DONE]\n\n"


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", code="invalid_request", param=param)


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or is not served by any replica.",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def no_ready_replica(model: str, detail: str, retry_after_s: int) -> GatewayError:
    return GatewayError(
        503,
        f"No live replica can serve model `{model}` right now ({detail}). Retry shortly.",
        type="service_unavailable_error",
        code="no_ready_replica",
        retry_after_s=retry_after_s,
    )


def model_unconfirmed(model: str, code: str, detail: str, retry_after_s: int) -> GatewayError:
    """A model missing from a view that cannot be trusted to say it does not exist: 503, not 404."""
    return GatewayError(
        503,
        f"The model `{model}` is not in the gateway's replica view, and that view is not current ({detail}). "
        "Retry shortly.",
        type="service_unavailable_error",
        code=code,
        param="model",
        retry_after_s=retry_after_s,
    )
