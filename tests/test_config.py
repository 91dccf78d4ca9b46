"""mitm.conf: it loads with every addon registered, and it documents every openflare_* option.

The addon modules are found, not listed: every addons/*.py that defines `addons = [...]`, so an
addon added later is covered without touching this file. The checks of mitm.conf hold for the file as
shipped and as its user edits it (test_checks_pass_on_an_edited_copy): no test depends on its values.
"""

import asyncio
import importlib
import logging
import re
from pathlib import Path

import pytest
from mitmproxy import command
from mitmproxy import eventsequence
from mitmproxy import optmanager
from mitmproxy.addons import script as script_addon
from mitmproxy.test import taddons
from mitmproxy.test import tflow

from addons import configcheck
from conftest import MITM_CONF
from conftest import REPO

BUNDLE = "openflare"  # addons/openflare.py: every addon below as one script (what `make run` loads)
ADDON_MODULES = sorted(
    p.stem
    for p in (REPO / "addons").glob("*.py")
    if re.search(r"^addons\s*=\s*\[", p.read_text(), re.M) and p.stem != BUNDLE
)


def register_all(tctx) -> list[str]:
    """Register (load hook only) every addon of every addon module; returns their option names."""
    before = set(tctx.options.keys())
    for name in ADDON_MODULES:
        module = importlib.import_module(f"addons.{name}")
        for addon in module.addons:
            tctx.master.addons.add(addon)
    return sorted(set(tctx.options.keys()) - before)


def test_addon_modules_found():
    assert {"features", "scorer"} <= set(ADDON_MODULES)
    assert "fields" not in ADDON_MODULES and "common" not in ADDON_MODULES


def test_every_addon_option_is_namespaced():
    with taddons.context() as tctx:
        added = register_all(tctx)
    assert added
    assert [k for k in added if not k.startswith("openflare_")] == []


# The checks below take the file's text, so they run the same on mitm.conf as it stands (shipped or edited by
# its user: `make test` stays green either way) and on the edited copies of test_checks_pass_on_an_edited_copy.


def check_loads(path: Path) -> None:
    """The file loads as mitmdump reads it (YAML, option types), with nothing left over: every key is an option
    of mitmdump, mitmweb or an OpenFlare addon (an unknown one would be ignored silently by mitmproxy)."""
    assert path.is_file()  # load_paths silently skips a missing file
    problems, _ = configcheck.check_file(path)
    assert problems == []
    opts = configcheck.all_options()
    optmanager.load_paths(opts, path)
    assert opts.deferred == {}


def commented_options(text: str) -> dict:
    """Options documented but left unset (the default, or `--set`): `# openflare_x: value`."""
    found = {}
    for m in re.finditer(r"^#\s*(openflare_\w+):(.*)$", text, re.M):
        found[m.group(1)] = optmanager.parse(f"v: {m.group(2).strip() or 'null'}")["v"]
    return found


def check_documents_every_option(text: str) -> None:
    """Every OpenFlare option is in the file: commented out with its default (set lines hold the user's value),
    and the file names no option that does not exist."""
    data = optmanager.parse(text)
    commented = commented_options(text)
    defaults = configcheck.all_options()
    names = sorted(configcheck.openflare_options())
    missing = [n for n in names if n not in data and n not in commented]
    assert missing == [], f"options missing from mitm.conf: {missing}"
    for n in names:
        if n in data:
            continue  # set: any value of the right type (check_loads) is the user's to choose
        default, value = defaults.default(n), commented[n]
        if isinstance(default, (list, tuple)):
            default, value = list(default), list(value)
        if default is None:
            continue  # commented out with an example value: unset means the default (None)
        assert value == default, f"mitm.conf documents {n}: {value!r}, but its default is {default!r}"
    stale = [k for k in {**commented, **data} if str(k).startswith("openflare_") and k not in names]
    assert stale == [], f"mitm.conf names options no addon registers: {stale}"


def check_comments(text: str) -> None:
    """Each option line, set or commented out, sits under a comment (options documented together may share one)."""
    option = re.compile(r"(# )?openflare_\w+:")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if option.match(line):
            j = i - 1
            while j >= 0 and option.match(lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"mitm.conf: no comment above {line!r}"


def test_mitm_conf_loads_with_nothing_left_over():
    check_loads(MITM_CONF)


def test_mitm_conf_documents_every_option_with_its_default():
    check_documents_every_option(MITM_CONF.read_text())


def test_every_option_has_a_comment_in_mitm_conf():
    check_comments(MITM_CONF.read_text())


def test_mitm_conf_states_the_precedence_rule_and_block_global():
    text = MITM_CONF.read_text()
    assert "--set on the command line" in text and ">  this file  >  the default" in text
    assert re.search(r"^(# )?block_global: ", text, re.M)


def edited(text: str, changes: dict[str, str]) -> str:
    """mitm.conf as a user edits it: each key's line (`# key: default`, or already set) set to a new value."""
    for key, value in changes.items():
        text, n = re.subn(rf"^(# )?{key}:.*$", f"{key}: {value}", text, flags=re.M)
        assert n == 1, key
    return text


USER_EDITS = {
    "openflare_threshold": "9",
    "openflare_model": "models/openflare-local.npz",  # another model spec (a path instead of a name)
    "openflare_record_days": "7",
    "openflare_allowlist": "[10.0.0.0/8]",
    "openflare_view_max_flows": "2000",
}


def test_checks_pass_on_an_edited_copy(tmp_path):
    """A user-edited mitm.conf (threshold 9, another model, ...) passes every check of this module: the
    suite never depends on the file's values. The same checks fail on real mistakes."""
    path = tmp_path / "mitm.conf"
    path.write_text(edited(MITM_CONF.read_text(), USER_EDITS))
    check_loads(path)
    check_documents_every_option(path.read_text())
    check_comments(path.read_text())

    typo = tmp_path / "typo.conf"
    typo.write_text(MITM_CONF.read_text() + "openflare_treshold: 9\n")
    with pytest.raises(AssertionError, match="did you mean openflare_threshold"):
        check_loads(typo)
    wrong_type = tmp_path / "type.conf"
    wrong_type.write_text(edited(MITM_CONF.read_text(), {"openflare_strikes": "three"}))
    with pytest.raises(AssertionError, match="openflare_strikes"):
        check_loads(wrong_type)
    text = MITM_CONF.read_text()
    defaults = configcheck.all_options()
    key = next(k for k in commented_options(text) if isinstance(defaults.default(k), int) and not isinstance(defaults.default(k), bool))
    wrong = re.sub(rf"^# {key}:.*$", f"# {key}: {defaults.default(key) + 1}", text, flags=re.M)
    with pytest.raises(AssertionError, match=f"documents {key}: {defaults.default(key) + 1}"):
        check_documents_every_option(wrong)
    with pytest.raises(AssertionError, match="missing from mitm.conf"):
        check_documents_every_option(re.sub(rf"^(# )?{key}:.*$", "", text, flags=re.M))


def test_user_edited_mitm_conf_loads_in_every_addon(model_path, tmp_path):
    """The edited copy loads with every addon registered and configured, as mitmdump would (the model is
    the one the tests use), and its values are the ones in force."""
    edits = {**USER_EDITS, "openflare_model": str(model_path)}
    path = tmp_path / "mitm.conf"
    path.write_text(edited(MITM_CONF.read_text(), edits))
    with taddons.context() as tctx:
        register_all(tctx)
        optmanager.load_paths(tctx.options, path)
        assert [k for k in tctx.options.deferred if k.startswith("openflare_")] == []
        assert (tctx.options.openflare_threshold, tctx.options.openflare_record_days) == (9, 7)


@pytest.mark.parametrize("name", [*ADDON_MODULES, BUNDLE])
def test_each_addon_loads_alone_as_a_script(name, model_conf, caplog):
    with taddons.context() as tctx:
        tctx.options.update_defer(**model_conf)
        ns = tctx.script(str(REPO / "addons" / f"{name}.py"))
        assert ns is not None and (ns.BUNDLED if name == BUNDLE else ns.addons)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_makefile_loads_the_documented_addon_order():
    """`make run`/`make web` load the bundle, which holds every addon in the order addons/common.py documents."""
    from addons import common
    from addons import openflare

    line = next(ln for ln in (REPO / "Makefile").read_text().splitlines() if ln.startswith("ADDONS :="))
    assert line.split()[2:] == ["-s", f"addons/{BUNDLE}.py"]
    assert all((REPO / p).is_file() for p in common.ADDON_ORDER)
    assert [f"addons/{type(a).__module__.rpartition('.')[2]}.py" for a in openflare.BUNDLED] == list(common.ADDON_ORDER)
    assert sorted(common.ADDON_ORDER) == [f"addons/{m}.py" for m in ADDON_MODULES]  # a new addon joins the bundle


def test_bundle_gives_fresh_addons_with_the_same_options(model_conf):
    """Loading the bundle registers exactly the options of the addons loaded one by one."""
    with taddons.context() as tctx:
        alone = register_all(tctx)
    with taddons.context() as tctx:
        before = set(tctx.options.keys())
        tctx.options.update_defer(**model_conf)
        ns = tctx.script(str(REPO / "addons" / f"{BUNDLE}.py"))
        bundled = sorted(set(tctx.options.keys()) - before)
    assert bundled == alone
    modules = {name: importlib.import_module(f"addons.{name}") for name in ADDON_MODULES}
    assert not {id(a) for a in ns.BUNDLED} & {id(a) for m in modules.values() for a in m.addons}


class _Calls:
    """Records every hook call as (addon, hook); `fail` names hooks that raise."""

    log: list = []

    def __init__(self, tag: str, fail: tuple[str, ...] = ()) -> None:
        self.tag, self.fail = tag, fail

    def _seen(self, hook: str) -> None:
        self.log.append((self.tag, hook))
        if hook in self.fail:
            raise RuntimeError(f"{self.tag} {hook}")

    def load(self, loader) -> None:
        loader.add_option(f"test_bundle_{self.tag}", int, 1, "test")
        self._seen("load")

    def requestheaders(self, flow) -> None:
        self._seen("requestheaders")

    async def request(self, flow) -> None:
        await asyncio.sleep(0)
        self._seen("request")

    def response(self, flow) -> None:
        self._seen("response")

    @command.command("test.bundle.cmd")
    def cmd(self) -> str:
        return self.tag


async def test_bundle_calls_each_hook_once_in_order(tmp_path):
    """Module-level forwarders: one call per addon and hook, in the listed order, sync and async alike;
    commands and options registered as if each addon were loaded; an exception stops the rest, as it does
    in mitmproxy's own walk of a script's addons."""
    script = tmp_path / "bundled.py"
    script.write_text(
        "import test_config\nfrom addons import common\n"
        "BUNDLED = [test_config._Calls('a'), test_config._Calls('b', fail=('response',)), test_config._Calls('c')]\n"
        "globals().update(common.bundle(*BUNDLED))\n"
    )
    _Calls.log = []
    loader = script_addon.ScriptLoader()  # as mitmdump -s loads it: the walk goes loader, script, module
    with taddons.context(loader) as tctx:
        tctx.configure(loader, scripts=[str(script)])
        for _ in range(500):  # the script loads in its watcher task
            if ns := loader.addons[0].ns:
                break
            await asyncio.sleep(0.01)
        assert {"test_bundle_a", "test_bundle_b", "test_bundle_c"} <= set(tctx.options.keys())
        assert tctx.master.commands.execute("test.bundle.cmd") == "c"  # the last one registered wins
        assert not hasattr(ns, "addons") and not hasattr(ns, "responseheaders") and callable(ns.requestheaders)
        _Calls.log = []
        f = tflow.tflow(resp=True)
        for e in eventsequence.iterate(f):
            await tctx.master.addons.handle_lifecycle(e)
    # b's response hook raised: c's never ran
    assert _Calls.log == [(t, h) for h in ("requestheaders", "request", "response") for t in "abc"][:-1]
