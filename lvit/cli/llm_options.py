"""The command-line options every LLM-using command shares (`lvit data generate`, `lvit eval llava-bench`,
`lvit eval scienceqa --arbiter-*`), so they read and behave the same everywhere. `prefix` names the option
family: "" gives `--base-url`, "arbiter" gives `--arbiter-base-url`."""

from __future__ import annotations

import typer

from lvit.errors import LvitError


def _flag(prefix: str, name: str) -> str:
    return f"--{prefix}-{name}" if prefix else f"--{name}"


def base_url(prefix: str = "", required: bool = True):
    return typer.Option(
        ... if required else None,
        _flag(prefix, "base-url"),
        help="The OpenAI-compatible endpoint's root, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, transformers "
        "serve), http://127.0.0.1:11434/v1 (Ollama) or https://api.openai.com/v1.",
    )


def model(prefix: str = "", required: bool = True):
    return typer.Option(... if required else None, _flag(prefix, "model"), help="The model name the endpoint serves.")


def api_key_env(prefix: str = ""):
    return typer.Option(
        None,
        _flag(prefix, "api-key-env"),
        help="The NAME of the environment variable holding the API key (the key itself is never logged or "
        "written). Leave out for an endpoint without a key.",
    )


def timeout(prefix: str = "", default: float = 120.0):
    return typer.Option(default, _flag(prefix, "timeout"), help="Seconds to wait for one answer before retrying.")


def retries(prefix: str = ""):
    return typer.Option(
        5,
        _flag(prefix, "retries"),
        help="Retries per request on 429 (waiting what Retry-After says), 5xx, timeouts and dropped connections; "
        "the wait doubles from 1 s otherwise.",
    )


def concurrency():
    return typer.Option(4, "--concurrency", help="Requests in flight at once.")


def check_concurrency(value: int) -> None:
    """Before any input is read: `--concurrency` must be 1 or more."""
    if value < 1:
        raise LvitError(f"--concurrency must be at least 1, got {value}")


def make_endpoint(base_url, model, api_key_env=None, timeout=120.0, retries=5, **extra):
    """An `lvit.llm.endpoint.Endpoint` from the options (checked: URL, model, key variable)."""
    from lvit.llm.endpoint import Endpoint

    return Endpoint(base_url, model, api_key_env=api_key_env, timeout=timeout, retries=retries, **extra)
