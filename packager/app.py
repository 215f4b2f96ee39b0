"""The Typer application object and the one place where errors become CLI output."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.text import Text

from manifests.errors import ConfigError, EdgepackError
from manifests.extras import missing_extra_message
from packager.display import safe_text

app = typer.Typer(
    name="edgepack",
    help="Build, sign, verify, serve and deploy ML models as signed edge modules.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def main() -> None:
    """Run the CLI: an :class:`EdgepackError`, or a package of an extra this install lacks, prints
    one line and exits with its code."""
    try:
        app()
    except EdgepackError as exc:
        # The message may quote what a device or the hub sent (a log request's error): as Text.
        err_console.print(Text.assemble(("error:", "bold red"), " ", safe_text(exc)), soft_wrap=True)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:
        # A command of an extra this install lacks (the hub's on a device): one line naming it.
        message = missing_extra_message(exc.name)
        if message is None:
            raise
        err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
        sys.exit(ConfigError.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted")
        sys.exit(130)
