"""One resumable run of requests to an OpenAI-compatible endpoint, shared by every command that asks an LLM
(`lvit data generate`, the LLaVA-Bench judge, the ScienceQA arbiter).

`run_requests` asks for every item not done yet, up to `concurrency` at a time (`run_concurrently`), and appends
each row to its crash-safe JSON Lines file as its reply comes (`lvit.llm.jsonl_log`), with a progress bar on a
terminal only. The caller says what to ask, which row to write and what was kept; the rest is here:

- Ctrl-C stops the run with `Interrupted` (the CLI exits 130): `<kept>; run the same command again to <rest>`;
- an `EndpointError` (a refusal retrying cannot fix) is raised again naming the item it was asking for, with
  `<kept>; <after_error>` added;
- with a `refused` handler, a `RequestRefused` (the endpoint refused that one request: HTTP 400/413/422, or a
  prompt counted too long before sending) becomes that item's row and the run goes on. Only when the first
  `REFUSAL_RULE` answers of a run are all refusals is the fault not one item's: the run stops, naming the
  cause, and writes no row for those items, so the same command asks for them again once the cause is fixed;
- either way the rows written stay, and the same command, which skips them, continues from there.

`ask` sends its requests with the caller's `ChatClient`, whose `Usage` counts requests and tokens;
`usage_summary(client)` is that count with the endpoint, as a results file records it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lvit.console import stderr_is_tty
from lvit.errors import Interrupted
from lvit.llm.endpoint import ChatClient, EndpointError, RequestRefused, run_concurrently
from lvit.llm.jsonl_log import append, open_append

Write = Callable[[Path, dict], None]
REFUSAL_RULE = 8
TOO_LONG_FIX = "lower --max-tokens, serve the model with a longer context (vLLM: --max-model-len), or send less context"


def run_requests(
    items: Sequence,
    ask: Callable[[Any], Any],
    files: dict[Path, dict[str, dict]],
    *,
    kept: Callable[[], str],
    desc: str,
    unit: str = "q",
    concurrency: int = 4,
    progress: bool | None = None,
    record: Callable[[Any, Any, Write], None] | None = None,
    postfix: Callable[[], dict] | None = None,
    rest: str = "continue",
    after_error: str = "rerun to continue",
    refused: Callable[[Any, RequestRefused, Write], None] | None = None,
    name: Callable[[Any], str] = str,
    too_long_fix: str = TOO_LONG_FIX,
) -> None:
    """Ask for every item and write a row for each; returns nothing: the rows are in `files` and on disk.

    - `items`: what is still to do (the caller leaves out what its files already hold);
    - `ask(item)`: the request(s) for one item, run on a worker thread; its result goes to `record`;
    - `files`: each output file -> its rows by id (as `read_rows` read them); a row written is added there;
    - `record(item, result, write)`, on the calling thread: `write(path, row)` for the row(s) of one result
      (append to `path`, one of `files`); without it, `result` is the row and goes to the only file;
    - `kept()`: what the files hold now, for the message that stops a run (see the module's docstring),
      with `rest` and `after_error`;
    - `refused(item, error, write)`: the row(s) of an item whose request was refused (see the module's
      docstring); without it a refusal stops the run like any `EndpointError`; `name(item)` names the item;
      `too_long_fix`: what the message that stops a run says to do about prompts too long for the context;
    - `desc`, `unit`, `postfix()`: the progress bar's label, unit and extra counts (shown on a terminal, or
      with `progress=True`).
    """
    from tqdm.auto import tqdm

    show = stderr_is_tty() if progress is None else progress
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not show, file=sys.stderr)
    try:
        with ExitStack() as stack:
            handles = {path: stack.enter_context(open_append(path)) for path in files}

            def write(path: Path, row: dict) -> None:
                append(handles[path], row)
                files[path][row["id"]] = row

            if record is None:
                (only,) = files
                record = lambda _item, row, write: write(only, row)  # noqa: E731
            held: list | None = []  # refusals before the first answer: None once one answer came
            for item, result, error in run_concurrently(items, ask, concurrency):
                if error is not None and not (refused is not None and isinstance(error, RequestRefused)):
                    raise _naming(error, name(item))
                if error is not None and held is not None:
                    held.append((item, error))
                    if len(held) >= REFUSAL_RULE:
                        raise _refusals_are_the_rule(held, name, too_long_fix)
                elif error is not None:
                    refused(item, error, write)
                else:
                    for earlier in held or []:
                        refused(*earlier, write)
                    held = None
                    record(item, result, write)
                bar.update(1)
                if postfix is not None:
                    bar.set_postfix(postfix(), refresh=False)
            for earlier in held or []:
                refused(*earlier, write)
    except KeyboardInterrupt:
        raise Interrupted(f"{kept()}; run the same command again to {rest}") from None
    except EndpointError as exc:
        raise EndpointError(f"{exc}\n{kept()}; {after_error}", exc.status) from None
    finally:
        bar.close()


def _naming(error: BaseException, item_name: str) -> BaseException:
    if isinstance(error, EndpointError):
        return EndpointError(f"{error} (asking for {item_name})", error.status)
    return error


def _refusals_are_the_rule(held: list, name, too_long_fix: str) -> EndpointError:
    item, error = held[-1]
    too_long = sum(e.too_long for _, e in held)
    cause = (
        f"{too_long} of them too long for the model's context: {too_long_fix}"
        if too_long
        else "check the model name and the options sent (--max-tokens, --temperature) against what the server accepts"
    )
    return EndpointError(
        f"the endpoint refused each of the first {len(held)} requests, so the fault is not one record's; the last, "
        f"for {name(item)}: {error}. {cause}. Nothing was written for these {len(held)}; the same command asks for "
        "them again once that is fixed",
        error.status,
    )


def usage_summary(client: ChatClient) -> dict:
    """The model and endpoint `client` asked, with the requests, retries and tokens it counted."""
    return {"model": client.endpoint.model, "base_url": client.endpoint.base_url, **client.usage.to_json()}
