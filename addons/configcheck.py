"""Check an options file as mitmdump reads it: `openflare check-config [FILE] [--set NAME=VALUE ...]`.

The file is parsed with mitmproxy's own YAML loader (`optmanager.parse`) and each value is checked against
the type of the option it names, with every option registered: mitmproxy's core options, its built-in
addons', mitmdump's, mitmweb's and the console's, and every OpenFlare addon's (the modules of
`common.ADDON_ORDER`, whatever options they register today). `--set` arguments are parsed as mitmdump
parses them (`OptManager.set`). Reported: YAML errors, unknown keys (with the nearest valid name), values of
the wrong type, values outside an option's choices. Exit 0 when clean, 2 otherwise.

Ranges and cross-option rules an addon checks in its `configure` (a threshold of 11, a missing model file)
are not run here: they need the addon itself; mitmdump reports them at startup.

`nearest()` and `openflare_options()` are also what the startup check (`addons.startup`) uses, so both
name the same suggestion.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import re
import sys
from pathlib import Path

from mitmproxy import exceptions
from mitmproxy import optmanager
from mitmproxy.utils import typecheck

DEFAULT_FILE = "mitm.conf"
PREFIX = "openflare_"
EXIT_OK = 0
EXIT_BAD = 2


class _Loader:
    """What an addon's `load(loader)` gets, registering into `opts` only (commands are not needed here)."""

    def __init__(self, opts: optmanager.OptManager) -> None:
        self.opts = opts

    def add_option(self, name, typespec, default, help, choices=None) -> None:  # noqa: A002 - mitmproxy's name
        self.opts.add_option(name, typespec, default, help, choices)

    def add_command(self, *args, **kwargs) -> None:
        pass


def _mitmproxy_addons() -> list:
    """Every addon whose options mitmdump, mitmweb or the mitmproxy console register."""
    from mitmproxy import addons
    from mitmproxy.addons import dumper
    from mitmproxy.addons import intercept
    from mitmproxy.addons import keepserving
    from mitmproxy.addons import readfile
    from mitmproxy.addons import view
    from mitmproxy.tools.web import static_viewer
    from mitmproxy.tools.web import webaddons

    found = [
        *addons.default_addons(),
        dumper.Dumper(),
        keepserving.KeepServing(),
        readfile.ReadFileStdin(),
        intercept.Intercept(),
        view.View(),
        webaddons.WebAddon(),
        webaddons.WebAuth(),
        static_viewer.StaticViewer(),
    ]
    try:  # the console needs urwid, which mitmproxy installs; without it, no console_* options
        from mitmproxy.tools.console import consoleaddons
        from mitmproxy.tools.console import keymap

        found += [consoleaddons.ConsoleAddon(None), keymap.KeymapConfig(None)]
    except ImportError:
        pass
    return found


def _openflare_addons() -> list[tuple[str, object]]:
    """(module path, addon) for every addon of every module in common.ADDON_ORDER, in that order."""
    from addons import common

    out = []
    for path in common.ADDON_ORDER:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        out += [(path, a) for a in module.addons]
    return out


@functools.cache
def openflare_options() -> dict[str, str]:
    """Every option an OpenFlare addon registers -> the module that registers it ("addons/scorer.py")."""
    out: dict[str, str] = {}
    for path, addon in _openflare_addons():
        opts = optmanager.OptManager()
        addon.load(_Loader(opts))
        out.update(dict.fromkeys(opts.keys(), path))
    return out


def openflare_only() -> optmanager.OptManager:
    """A fresh options object with the OpenFlare addons' options only (cheap: no mitmproxy addon is made)."""
    opts = optmanager.OptManager()
    loader = _Loader(opts)
    for _, addon in _openflare_addons():
        addon.load(loader)
    return opts


def value_problem(opts: optmanager.OptManager, key: str, value) -> str | None:
    """Why `value` (parsed from a file, or mitmproxy's deferred `--set` strings) cannot be `key`'s, or None.
    `opts` must know `key`; a good value is applied to it."""
    try:
        if isinstance(value, optmanager._UnconvertedStrings):  # noqa: SLF001 - a --set mitmproxy has not parsed yet
            opts.set(*([f"{key}={v}" for v in value.val] or [key]))  # `--set key` alone: true, or None
        else:
            opts.update(**{key: value})
    except TypeError:
        spec = typecheck.typespec_to_str(opts._options[key].typespec)  # noqa: SLF001
        return f"{key}: {display(value)} is not of type {spec}"
    except (exceptions.OptionsError, ValueError) as e:
        return f"{key}: {e}"
    return _choice_problem(opts, key)


def all_options() -> optmanager.OptManager:
    """A fresh options object with every option mitmdump/mitmweb and the OpenFlare addons register."""
    from mitmproxy import options

    opts = options.Options()
    loader = _Loader(opts)
    for addon in _mitmproxy_addons():
        if hasattr(addon, "load"):
            addon.load(loader)
    for _, addon in _openflare_addons():
        addon.load(loader)
    return opts


def nearest(name: str, names) -> str | None:
    """The valid name closest to a misspelt one (difflib), or None when none is close.

    An `openflare_*` name is matched against `openflare_*` names first, so a typo in one of ours never
    suggests one of mitmproxy's.
    """
    names = sorted(names)
    if name.startswith(PREFIX):
        ours = [n for n in names if n.startswith(PREFIX)]
        hit = difflib.get_close_matches(name, ours, n=1, cutoff=0.6)
        if hit:
            return hit[0]
    hit = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return hit[0] if hit else None


_USERINFO = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")


def display(value) -> str:
    """An option value for a log line or report: repr, with any password in a URL (`://user:pw@`) masked."""
    return _USERINFO.sub(r"\1***@", repr(value))


def unknown(name: str, names) -> str:
    """'unknown option X (did you mean Y?)', or '... (no option has a similar name)'."""
    near = nearest(name, names)
    return f"unknown option {name} ({f'did you mean {near}?' if near else 'no option has a similar name'})"


def _choice_problem(opts: optmanager.OptManager, name: str) -> str | None:
    """mitmproxy does not enforce `choices` (the addons do, in configure): say so here."""
    choices = opts._options[name].choices  # noqa: SLF001 - mitmproxy keeps choices only there
    value = getattr(opts, name)
    if not choices:
        return None
    bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v not in choices]
    if not bad:
        return None
    near = nearest(str(bad[0]), choices)
    hint = f" (did you mean {near}?)" if near else ""
    return f"{name}: {bad[0]!r} is not one of {', '.join(map(str, choices))}{hint}"


def check_data(opts: optmanager.OptManager, data: dict, where: str) -> list[str]:
    """Problems of a parsed options file: each key known, each value of its option's type and choices.
    Good values are applied to `opts` (so `--set` checks see the file's values, as in mitmdump)."""
    problems = []
    names = opts.keys()
    for key, value in data.items():
        if key not in names:
            problems.append(f"{where}: {unknown(str(key), names)}")
            continue
        if msg := value_problem(opts, key, value):
            problems.append(f"{where}: {msg}")
    return problems


def check_sets(opts: optmanager.OptManager, specs: list[str]) -> list[str]:
    """Problems of `--set NAME=VALUE` arguments, parsed as mitmdump parses them (all values of a name at once)."""
    grouped: dict[str, list[str]] = {}
    for spec in specs:
        grouped.setdefault(spec.split("=", 1)[0], []).append(spec)
    problems = []
    names = opts.keys()
    for key, key_specs in grouped.items():
        if key not in names:
            problems.append(f"--set: {unknown(key, names)}")
            continue
        try:
            opts.set(*key_specs)
        except (exceptions.OptionsError, TypeError, ValueError) as e:
            problems.append(f"--set: {e}")
            continue
        if msg := _choice_problem(opts, key):
            problems.append(f"--set: {msg}")
    return problems


def check_file(path: Path, specs: list[str] = ()) -> tuple[list[str], optmanager.OptManager]:
    """(problems, the options as they would stand) for an options file plus `--set` specs."""
    opts = all_options()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [f"{path}: cannot read: {e}"], opts
    try:
        data = optmanager.parse(text)
    except exceptions.OptionsError as e:
        return [f"{path}: {e}"], opts
    if not isinstance(data, dict):
        return [f"{path}: not a mapping of option names to values"], opts
    return check_data(opts, data, str(path)) + check_sets(opts, list(specs)), opts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="openflare check-config",
        description="Check an options file (YAML, as mitmdump and mitmweb read it) and --set arguments: "
        "unknown keys (with the nearest valid name), values of the wrong type or outside their choices.",
    )
    parser.add_argument("file", nargs="?", default=DEFAULT_FILE, help=f"the options file (default: {DEFAULT_FILE})")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="an option as given to mitmdump (repeatable); a --set wins over the file")  # fmt: skip
    args = parser.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"{path}: no such file", file=sys.stderr)
        return EXIT_BAD
    problems, opts = check_file(path, args.sets)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        return EXIT_BAD
    changed = [k for k in sorted(openflare_options()) if opts.has_changed(k)]
    shown = ", ".join(f"{k}={display(getattr(opts, k))}" for k in changed) or "none (every OpenFlare option at its default)"
    print(f"{path}: OK. OpenFlare options changed: {shown}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
