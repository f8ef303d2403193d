"""One error policy for every command line of the project (runtime, training, export, tools).

A mistake a user can fix (a bad option, a bad file, a full disk) prints one line naming
the option or file and exits 1, with no traceback; click's usage errors exit 2. Anything
else is a bug in this code: its traceback is kept and a last line says so, exit 70.
"""

from __future__ import annotations

import math
import os
import sys
import traceback

import click

from ..errors import BackendUnavailableError, ModelFileError, NonFiniteError
from .fileio import OutputError

EXIT_BUG = 70  # sysexits.h EX_SOFTWARE: an internal software error
BUG_LINE = ("internal error: this is a bug in ddpm-deploy, not a problem with your input; "
            "please report it with the traceback above")
# Errors of the torch-free runtime that a user can act on (ValueError: a bad argument).
RUNTIME_USER_ERRORS = (ModelFileError, BackendUnavailableError, NonFiniteError, OutputError,
                       ValueError)


def finite_float(ctx, param, value):
    """click callback: FloatRange lets nan through (every comparison with nan is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def one_line(err: BaseException) -> str:
    """The error's message on a single line (an embedded newline would hide the cause)."""
    return " ".join(str(err).split()) or type(err).__name__


def _closed_stdout() -> None:
    """The reader of our stdout went away (``| head``): not a bug. Point stdout at
    /dev/null so the interpreter's last flush cannot raise again, say so once, exit 1."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    try:
        click.echo("Error: standard output was closed before the command finished "
                   "(broken pipe); each file written is whole or absent", err=True)
    except OSError:
        pass
    sys.exit(1)


def _guard(base: type[click.Command], user_errors: tuple[type[BaseException], ...]):
    class Guarded(base):
        def invoke(self, ctx: click.Context):
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.ClickException, click.Abort):
                raise
            except BrokenPipeError:
                _closed_stdout()
            except user_errors as err:
                raise click.ClickException(one_line(err)) from None
            except Exception:
                traceback.print_exc()
                click.echo(BUG_LINE, err=True)
                sys.exit(EXIT_BUG)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def guarded_command(*user_errors: type[BaseException]) -> type[click.Command]:
    """``@click.command(cls=guarded_command(SomeError, ...))``: the policy above."""
    return _guard(click.Command, RUNTIME_USER_ERRORS + user_errors)


def guarded_group(*user_errors: type[BaseException]) -> type[click.Group]:
    """The same for a group: errors of every subcommand pass through the group's invoke."""
    return _guard(click.Group, RUNTIME_USER_ERRORS + user_errors)
