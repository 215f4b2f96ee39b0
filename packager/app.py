"""The Typer application object and the one place where errors become CLI output."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from manifests.errors import EdgepackError

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
    """Run the CLI: an :class:`EdgepackError` prints one line and exits with its code."""
    try:
        app()
    except EdgepackError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted")
        sys.exit(130)
