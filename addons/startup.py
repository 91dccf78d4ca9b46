"""Once per mitmdump/mitmweb process, whichever OpenFlare addons are loaded: flags win, bad keys stop startup.

`addons/__init__.py` calls `install()` when the `addons` package is first imported inside mitmproxy
(`ctx.master` is set): that is when the first OpenFlare script loads, the bundle (addons/openflare.py) or any
addon alone, before any OpenFlare option is registered and before any addon module runs. Python imports a
package once, so this runs once per process however many OpenFlare scripts are loaded, and reports once.

1. `--set` wins over the options file, for every key. mitmproxy applies `--set` first and then
   `<confdir>/config.yaml` (and `config.yml`) over it, so a key in the file beats the same key on the command
   line (mitmproxy issue #5069). mitmproxy keeps no record of its command line, so the `--set` arguments
   are read again from `sys.argv` (only under mitmdump, mitmweb or mitmproxy) and applied once more for the
   keys the file also sets: a known option at once, an OpenFlare one (not registered yet) as a deferred
   value, which mitmproxy applies when the addon registers the option.
2. Every `openflare_*` key mitmproxy deferred (all of them: no OpenFlare option is registered yet) is checked
   against every OpenFlare addon's options (`configcheck`): an unknown key, or a value of the wrong type, is
   logged as an ERROR naming the nearest valid option or the type, which makes mitmdump and mitmweb exit
   before serving (mitmproxy would ignore an unknown key silently, and stop on a wrong type with a traceback).
   A bad value is taken out of the deferred ones, so the addon starts on its default until the exit.
3. On the next turn of the event loop (the scripts being loaded have registered their options by then): a
   valid key whose addon is not loaded is warned about, and the OpenFlare options not at their defaults are
   logged once, with where each came from.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from mitmproxy import exceptions
from mitmproxy import optmanager

from addons import configcheck

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.yaml", "config.yml")  # what mitmproxy's main reads from the confdir, in this order
NOT_REAPPLIED = frozenset({"confdir", "scripts"})  # the file's location itself; scripts load as the file says
PROGRAMS = ("mitmdump", "mitmweb", "mitmproxy")


def command_line_sets(argv: list[str]) -> dict[str, list[str]]:
    """The `--set NAME[=VALUE]` (or `--set=NAME[=VALUE]`) arguments of a mitmdump command line, by name, in order."""
    specs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break  # the rest are mitmdump's filter expressions
        if arg == "--set" and i + 1 < len(argv):
            specs.append(argv[i + 1])
            i += 1
        elif arg.startswith("--set="):
            specs.append(arg.removeprefix("--set="))
        i += 1
    grouped: dict[str, list[str]] = {}
    for spec in specs:
        grouped.setdefault(spec.split("=", 1)[0], []).append(spec)
    return grouped


def file_keys(confdir: str) -> dict[str, tuple[object, Path]]:
    """Each key of the options files mitmproxy read at startup -> (value, file); a later file wins."""
    out: dict[str, tuple[object, Path]] = {}
    for name in CONFIG_FILES:
        path = Path(os.path.expanduser(confdir)) / name
        try:
            data = optmanager.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, exceptions.OptionsError):
            continue  # absent; a broken file has already stopped mitmproxy
        if isinstance(data, dict):
            out.update({str(k): (v, path) for k, v in data.items()})
    return out


def flags_win(opts: optmanager.OptManager, files: dict, sets: dict[str, list[str]]) -> list[str]:
    """Apply again the `--set`s of keys the file also sets; returns those keys."""
    both = [k for k in sets if k in files and k not in NOT_REAPPLIED]
    for key in both:
        value, path = files[key]
        try:
            opts.set(*sets[key], defer=True)
        except exceptions.OptionsError as e:
            logger.error("OpenFlare: %s", e)
            continue
        logger.info("OpenFlare: --set %s wins over %s in %s", " --set ".join(sets[key]), configcheck.display(value), path)
    return both


def where(key: str, files: dict, sets: dict) -> str:
    if key in sets:
        return "on the command line (--set)"
    if key in files:
        return f"in {files[key][1]}"
    return "in the options"  # set some other way (mitmweb's options page)


def check_deferred(opts: optmanager.OptManager, files: dict, sets: dict) -> list[str]:
    """Step 2: an ERROR for each unknown or wrongly typed `openflare_*` key (a bad value is dropped)."""
    ours = configcheck.openflare_only()
    names = ours.keys() | opts.keys()
    bad = []
    for key in sorted(k for k in opts.deferred if k.startswith(configcheck.PREFIX)):
        if key not in ours:
            msg = configcheck.unknown(key, names)
        elif problem := configcheck.value_problem(ours, key, opts.deferred[key]):
            msg = problem
            del opts.deferred[key]  # else mitmproxy stops on it with a traceback; the error below stops it cleanly
        else:
            continue
        bad.append(key)
        logger.error("OpenFlare: %s: %s; startup stops here (`openflare check-config` checks a file)", where(key, files, sets), msg)
    return bad


def report(opts: optmanager.OptManager, files: dict, sets: dict) -> None:
    """Step 3: keys no loaded addon read, then the options in force."""
    registry = configcheck.openflare_options()
    for key in sorted(k for k in opts.deferred if k in registry):
        logger.warning("OpenFlare: %s is set %s, but %s, which reads it, is not loaded: it has no effect",
                       key, where(key, files, sets), registry[key])  # fmt: skip
    changed = [k for k in sorted(opts.keys()) if k.startswith(configcheck.PREFIX) and opts.has_changed(k)]
    if not changed:
        logger.info("OpenFlare options: every one at its default")
        return
    shown = []
    for k in changed:
        src = "--set" if k in sets else (files[k][1].name if k in files else "")
        shown.append(f"{k}={configcheck.display(getattr(opts, k))}" + (f" ({src})" if src else ""))
    logger.info("OpenFlare options in force (not the defaults): %s", ", ".join(shown))


def install(master) -> None:
    """Steps 1-3 above for this master (called once, by the `addons` package's first import inside mitmproxy)."""
    opts = master.options
    prog = Path(sys.argv[0]).name if sys.argv else ""
    sets = command_line_sets(sys.argv[1:]) if prog.startswith(PROGRAMS) else {}
    files = file_keys(opts.confdir)
    flags_win(opts, files, sets)
    try:
        check_deferred(opts, files, sets)
    except Exception as e:  # noqa: BLE001 - an addon module that does not import: its own import says why
        logger.warning("OpenFlare: options not checked: an addon module failed to import: %r", e)
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no event loop (a synchronous harness): nothing loads after this anyway
    loop.call_soon(report, opts, files, sets)
