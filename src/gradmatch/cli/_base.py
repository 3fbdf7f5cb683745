"""What every command shares: the parser that reports a usage error as one line, the help formatter, the output
flags (-q / -v), a subcommand's parser, and helpers for flags that more than one command has."""

from __future__ import annotations

import argparse

from gradmatch.errors import UserError

#: How the local data root is given, in every command that reads data.
DATA_DIR_HELP = "local data root holding <root>/<preset>/<split>.jsonl (default: $GRADMATCH_DATA_DIR, else the hub)"


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2, and lets a command's options come
    before, between or after its positional arguments."""

    intermixed = False

    def error(self, message: str):
        command = self.prog.removeprefix("gradmatch").strip()
        raise UserError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")

    def parse_known_args(self, args=None, namespace=None):
        if self.intermixed and not getattr(self, "_inside", False):
            self._inside = True  # parse_known_intermixed_args calls parse_known_args itself
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._inside = False
        return super().parse_known_args(args, namespace)


class Formatter(argparse.HelpFormatter):
    """Examples as written, descriptions wrapped; every option's default shown when it has a meaningful one."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" not in text and default not in (None, False, "", [], argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def output_flags() -> argparse.ArgumentParser:
    """-q / -v, the same on every command (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    group = p.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing but errors and the final line (no progress bars, no library logs)")
    group.add_argument("-v", "--verbose", action="store_true", help="print more detail (informational log lines)")
    return p


def command(sub, name: str, *, help: str, description: str, examples: list[str]):
    """A subcommand parser with the output flags, shown defaults and its examples."""
    p = sub.add_parser(name, help=help, description=description, parents=[OUTPUT], formatter_class=Formatter,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    p.intermixed = True
    return p


class Removed(argparse.Action):
    """A flag that no longer exists: one line saying what replaced it."""

    def __init__(self, option_strings, dest, message: str = "", **kwargs):
        kwargs.setdefault("nargs", "?")
        super().__init__(option_strings, dest, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(self.message)


def filters(given: list[str]) -> dict[str, list] | None:
    """``["label=0,1"]`` as ``{"label": [0, 1]}`` (integers where the value is one)."""
    found: dict[str, list] = {}
    for item in given:
        column, sep, values = item.partition("=")
        if not sep or not column.strip() or not values.strip():
            raise UserError(f"--filter {item!r}: write COLUMN=VALUE[,VALUE...], e.g. label=0")
        parsed = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in values.split(",")]
        found.setdefault(column.strip(), []).extend(parsed)
    return found or None


#: -q / -v, a parent parser of every command.
OUTPUT = output_flags()
