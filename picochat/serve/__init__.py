"""The HTTP server: an OpenAI-compatible API and a chat page over the continuous-batching scheduler.

`api.create_app` builds the app (routes, errors, metrics, the page in `ui/`); `protocol` validates
requests and turns them into scheduler jobs; `generation` and `handlers` submit them and stream or
collect the answers; `cli` is `picochat serve`. Needs the `serve` extra (FastAPI, uvicorn,
prometheus-client); nothing outside this package and `bench/serve.py` imports it.
"""
