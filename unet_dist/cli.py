"""Shared entry-point plumbing: user errors become one line on stderr and exit code 2.

Every entry point builds its parser with :func:`parser`, so a bad argument reads like a bad config
key (``error: --batch-size: expected an integer >= 1, got '0'``), and its ``--help`` shows the
module's whole description, each flag's default and accepted values, and where the config keys are
documented. Heavy modules (torch, Ray, MLflow) are imported after these checks, so a mistake is
reported in well under a second.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap
from typing import Callable, NoReturn

from unet_dist.errors import UnetDistError

CONFIG_DOC = "docs/configuration.md"


def run_main(fn: Callable[[], object]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        fn()
    except UnetDistError as e:
        sys.stderr.write(f"{_fresh_line()}error: {one_line(str(e))}\n")  # one write: no other thread can split it
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def one_line(text: str) -> str:
    """The message on one line whatever it quotes: line breaks and other control characters in a
    value the user typed are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fresh_line() -> str:
    """A newline first while Ray forwards worker logs to this process: its thread prints each line
    as two writes (text, then newline), and the error line must not be glued to a worker's."""
    ray = sys.modules.get("ray")
    return "\n" if ray is not None and ray.is_initialized() else ""


# ------------------------------------------------------------------------------------- parsers
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs and adds each flag's default, unless its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False or action.default == [] \
                or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the project's one line and exit code 2 (no usage block)."""

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - quotes unrecognized blank arguments
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            shown = " ".join(repr(a) if not a.strip() or " " in a else a for a in extras)
            self.error(f"unrecognized arguments: {shown}")
        return parsed

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument ([^:]+): ", lambda m: f"{m.group(1).split('/')[0]}: ", message)
        sys.stderr.write(f"error: {one_line(message)} (see {self.prog} --help)\n")
        sys.exit(2)


def plain(doc: str) -> str:
    """A module docstring as help text: reST roles and double backquotes dropped."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc.strip())
    return text.replace("``", "`").replace("::\n", ":\n")


def parser(prog: str, doc: str, config: bool = False) -> ArgumentParser:
    """The parser of ``python -m <prog>``: the module docstring ``doc`` as its description and a
    pointer to the config docs; ``config``: it also takes ``--config FILE`` / ``--set KEY=VALUE``."""
    epilog = textwrap.fill(
        f"Config keys, their defaults and accepted values: {CONFIG_DOC} (in the repository). "
        "Bad input ends with one line, 'error: <file, key or argument>: ...', and exit code 2." if config else
        "Bad input ends with one line, 'error: <argument or file>: ...', and exit code 2. "
        f"Config keys (of the models it loads): {CONFIG_DOC} (in the repository).", 100)
    p = ArgumentParser(prog=prog, description=plain(doc), epilog=epilog, formatter_class=_Formatter,
                       allow_abbrev=False)
    if config:
        from unet_dist.config import add_config_args

        add_config_args(p)
    return p


# --------------------------------------------------------------------------- argument values
def count(text: str) -> int:
    """An argparse type: a whole number >= 1 (sizes, batch sizes, sample counts)."""
    return _integer(text, 1)


def natural(text: str) -> int:
    """An argparse type: a whole number >= 0 (0 usually means "the default" or "none")."""
    return _integer(text, 0)


def _integer(text: str, low: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
    return value


def non_empty(text: str) -> str:
    """An argparse type: a path or URL, which must not be empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def location(text: str) -> str:
    """An argparse type: a local path (made absolute) or a storage URL, typos such as ``s3:/``
    refused by the storage module."""
    from unet_dist import storage

    try:
        return str(storage.location(non_empty(text)))
    except UnetDistError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fail(argument: str, message: str) -> NoReturn:
    """An argument that parsed but does not fit (a device that is not there): the same one line."""
    raise UnetDistError(f"{argument}: {message}")
