"""The `fedmri` command: one entry point for sites, training, release and deployment."""

from __future__ import annotations

import typer

from sites.cli import app as sites_app

app = typer.Typer(
    help="fedmri: federated, differentially private latent diffusion for brain MRI.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,
)
app.add_typer(sites_app, name="sites")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
