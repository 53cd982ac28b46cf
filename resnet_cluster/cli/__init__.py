"""The ``resnet-cluster`` command line (typer + rich). The only package that prints."""

from __future__ import annotations

import logging
import sys

import typer

from resnet_cluster.errors import UserError

app = typer.Typer(
    name="resnet-cluster",
    help="Reproduce 'Deep Residual Learning for Image Recognition' on Ray clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show debug logs on stderr, including errors that are handled on purpose."
    ),
) -> None:
    """Reproduce 'Deep Residual Learning for Image Recognition' on Ray clusters."""
    if verbose:
        setup_logging(logging.DEBUG)


def setup_logging(level: int) -> None:
    """The package's module loggers (``resnet_cluster.*``) at ``level`` on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("resnet_cluster")
    root.addHandler(handler)
    root.setLevel(level)


def _register() -> None:
    from resnet_cluster.cli import control, data, models, runs, submit

    app.command("submit")(submit.submit)
    app.command("status")(control.status)
    app.command("stop")(control.stop)
    app.add_typer(runs.app, name="runs")
    app.add_typer(data.app, name="data")
    app.add_typer(models.app, name="models")
    from resnet_cluster.cli import eval as eval_cli; app.command("eval")(eval_cli.eval_command)  # noqa: E702
    from resnet_cluster.cli import analyze; app.add_typer(analyze.app, name="analyze")  # noqa: E702
    from resnet_cluster.cli import sweep; app.add_typer(sweep.app, name="sweep")  # noqa: E702


_register()


def main() -> None:
    """Console-script entry: user errors become one paragraph on stderr and exit code 2."""
    from rich.markup import escape

    from resnet_cluster.cli.common import err_console

    try:
        app()
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
