"""`dlora simulate | run | serve | validate | init-demo | capacity | plan | reproduce | profile`:
parse, call one library function, print a table to stdout, write outputs; logs and progress on
stderr. Exit 0 on success, 1 on a failed run, 2 on bad usage or input. torch is imported only
inside the executor commands. One module per command group; the table below is the app's
command list, in the order `dlora --help` shows it."""

from __future__ import annotations

import logging
import sys

from .common import app
from .demo import init_demo
from .profile import profile_app
from .run import run_live
from .serve import serve_cmd
from .simulate import simulate
from .studies import capacity, plan, reproduce, validate_cmd

app.command()(simulate)
app.command("run")(run_live)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(serve_cmd)
app.command("validate")(validate_cmd)
app.command("init-demo")(init_demo)
app.command()(capacity)
app.command()(plan)
app.command()(reproduce)
app.add_typer(profile_app, name="profile")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


__all__ = ["app", "main"]
