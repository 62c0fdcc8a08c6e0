"""What every `registry` subcommand shares: settings, exit codes, `--json`, quiet stdout, rich output.

Exit codes: 0 all is well; 1 the registry disagrees or something is unhealthy (a layer that
cannot be asked, a digest that does not match, a model that does not resolve, a version or alias
MLflow does not have); 2 usage or configuration errors (bad arguments, a bad `REGISTRY_*` value,
a layer the command needs is not configured), decided before anything is asked.

An error is one line on stderr (`error: ...`): without `-v` only ERROR records of the libraries
are logged beside it (the answer carries every layer's outcome), and no progress bar is drawn.

Nothing secret is printed: answers, errors, logs and MLflow's own prints go through
`registry.redaction` (URL credentials and the configured secrets become `***`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from typing import IO, Any, Callable, Iterator, Optional

import click

from registry.errors import PublishError, RegistryError, SelectorError, SettingsError
from registry.redaction import RedactingStream, install_log_redaction, redact, redact_in_place, redact_text
from registry.settings import RegistrySettings, check_model_names

OK, UNHEALTHY, USAGE = 0, 1, 2



class Problem(click.ClickException):
    """A failure with an exit code (1 unhealthy, 2 usage/configuration), printed as `error: ...` on stderr."""

    def __init__(self, message: str, exit_code: int = UNHEALTHY, **extra: Any):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads the instance's, per failure
        self.extra = extra

    def show(self, file: Optional[IO[Any]] = None) -> None:
        click.echo(f"error: {redact_text(self.format_message())}", err=True)


def config_problem(message: str) -> Problem:
    return Problem(message, USAGE)


def load_settings() -> RegistrySettings:
    """The service's settings from the environment; a bad value is a configuration error (exit 2)."""
    try:
        return RegistrySettings.from_env()
    except SettingsError as exc:
        raise config_problem(str(exc)) from exc


def check_names(names: tuple[str, ...] | list[str]) -> list[str]:
    try:
        return check_model_names(list(names))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def exit_code_of(exc: BaseException) -> int:
    """Which exit code a project error means: the caller's mistake (2) or the registry said no / is unhealthy (1).

    Usage is what is wrong before anything is asked (a bad setting or selector, a publish refused
    before it reached MLflow); whatever MLflow answers (no such version, alias or model, a
    refusal) is the registry disagreeing: 1.
    """
    if isinstance(exc, (SettingsError, SelectorError)):
        return USAGE
    if isinstance(exc, PublishError) and exc.__cause__ is None:
        return USAGE
    return UNHEALTHY  # the registry said no, could not be asked, had nothing, or answered garbage


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """MLflow prints progress ("View run ... at ...") to stdout; stdout is kept for the answer only."""
    with contextlib.redirect_stdout(RedactingStream(sys.stderr)):
        yield


class Output:
    """Where a command's answer goes: JSON or rich tables on the stdout the command started with."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.stdout = RedactingStream(sys.stdout)  # taken before quiet_stdout() swaps it
        self._console: Any = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            tty = hasattr(self.stdout, "isatty") and self.stdout.isatty()
            width = None if tty else int(os.environ.get("COLUMNS") or 120)
            self._console = Console(file=self.stdout, width=width, highlight=False, soft_wrap=False)  # type: ignore[arg-type]  # a text stream
        return self._console

    def done(self, data: dict[str, Any], render: Callable[[Any], None], code: int = OK) -> None:
        """Print the answer (JSON, or `render(console)` for people) and exit with `code`."""
        redact_in_place(data)  # in place: `render` reads the same objects
        if self.as_json:
            print(json.dumps(data, indent=2, sort_keys=False, default=str), file=self.stdout, flush=True)
        else:
            render(self.console)
        raise click.exceptions.Exit(code)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--json` on a subcommand, and the error handling every subcommand shares.

    A project error becomes `error: ...` on stderr with its exit code; with `--json` the same is
    also written to stdout as `{"ok": false, "error": ...}`, so a machine always gets JSON.
    """

    @click.option("--json", "as_json", is_flag=True, help="machine-readable JSON on stdout")
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, **kwargs: Any) -> Any:
        try:
            try:
                return fn(*args, out=Output(as_json), **kwargs)
            except RegistryError as exc:
                raise Problem(str(exc), exit_code_of(exc)) from exc
        except Problem as exc:
            if as_json:
                print(json.dumps(redact({"ok": False, "error": exc.format_message(), "exit_code": exc.exit_code, **exc.extra}),
                                 indent=2, default=str), file=sys.stdout, flush=True)
            raise

    return wrapper


def age_s(epoch: Optional[float]) -> Optional[float]:
    return None if epoch is None else round(max(0.0, time.time() - epoch), 1)


def human_age(seconds: Optional[float]) -> str:
    """`42s`, `7m`, `3h`, `2d`."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def esc(value: object) -> str:
    """Text for rich markup: `[file: miss]` in a message is text, not a style tag."""
    from rich.markup import escape

    return escape(str(value))


def quiet_progress() -> None:
    """No progress bars on the operator's terminal: MLflow's artifact bars, tqdm's and the Hub's
    (set before MLflow or transformers is imported; a value the user set explicitly wins)."""
    for variable, value in (("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("TQDM_DISABLE", "1"),
                            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(variable, value)


def setup_logging(verbose: bool) -> None:
    """Logs on stderr: INFO and up with `-v`; otherwise only ERROR records, so an error is the one
    `error: ...` line the command prints (every layer's outcome is in the answer itself)."""
    from registry.logs import install_record_fields

    level = logging.INFO if verbose else logging.ERROR
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig; the handler's own level also holds back libraries that set theirs
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        handler.setLevel(level)
        root.addHandler(handler)
        root.setLevel(level)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # MLflow sets its loggers' level when it is imported
    install_log_redaction(("registry", "training"))
    install_record_fields()
