"""The server's settings (`picochat serve` options), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the server is a deliberate --host 0.0.0.0
    port: int = 8000
    api_key: str | None = None  # Bearer key for /v1/* (None: open)
    max_body_bytes: int = 1 << 20  # request bodies above this get 413
    max_n: int = 16  # samples per request
    max_tokens: int | None = None  # cap on a request's max_tokens (None: the context is the bound)
    serial: bool = False  # one request at a time (upstream's web server; a benchmark baseline)
    retry_after_s: int = 1  # Retry-After on 503s
    model_name: str = "picochat"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (got {self.port})")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024 (got {self.max_body_bytes})")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1 (got {self.max_n})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0 (got {self.retry_after_s})")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be blank")
