"""How every ``perturb-lens`` command reports a failure: one line, no traceback.

User errors (bad config, missing or damaged file, full disk, locked run...) print ``Error: ...``
with the message, which names the thing and the fix, and exit 1. Anything else is a bug or an
input nobody anticipated: one line naming the exception, exit 1, and the traceback only with
``perturb-lens --verbose``.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import typer

_verbose = [False]


def set_verbose(on: bool) -> None:
    """``perturb-lens --verbose``: unexpected errors also print their traceback."""
    _verbose[0] = on


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input or environment, not a bug.

    ValueError covers the project's ConfigError, UnknownHookError, ModelLoadError, SAELoadError,
    SAEMismatchError, ConfigMismatchError, ChecksumError, ...; RuntimeError covers RunLockedError;
    ArithmeticError the non-finite activation errors. UnknownDirectionError is a KeyError.
    """
    from perturb_lens.directions.base import UnknownDirectionError  # lazy: `--help` stays fast

    return (ValueError, OSError, RuntimeError, ArithmeticError, ImportError, UnknownDirectionError)


def error_text(err: BaseException) -> str:
    """The message of ``err`` and its notes (e.g. which file was being written)."""
    notes = getattr(err, "__notes__", None) or []
    return "\n".join([str(err) or type(err).__name__, *notes])


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn an exception raised inside into ``Error: ...`` on stderr and exit code 1."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as err:
        if isinstance(err, user_error_types()):
            typer.echo(f"Error: {error_text(err)}", err=True)
            raise typer.Exit(1) from err
        if _verbose[0]:
            typer.echo("".join(traceback.format_exception(err)), err=True)
        typer.echo(
            f"Error: unexpected {type(err).__name__}: {error_text(err)}\n(a bug, or an input "
            "perturb-lens does not check yet: rerun with `perturb-lens --verbose ...` for the "
            "traceback and report it)",
            err=True,
        )
        raise typer.Exit(1) from err


def checked_out(out: str | None, option: str = "--out", example: str = "runs/my-run") -> str | None:
    """``out`` unless it is empty (an empty path would write into the current folder)."""
    if out is not None and not out.strip():
        typer.echo(
            f"Error: {option} is empty, which would write into the current folder: give a path "
            f"(e.g. {option} {example}), or leave {option} out for the default.",
            err=True,
        )
        raise typer.Exit(1)
    return out
