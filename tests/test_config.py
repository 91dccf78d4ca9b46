"""mitm.conf: it loads with every addon registered, and it documents every openflare_* option.

The addon modules are found, not listed: every addons/*.py that defines `addons = [...]`, so an
addon added later is covered without touching this file.
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

from conftest import MITM_CONF
from conftest import REPO
from conftest import make_confdir

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
    assert "featurize" not in ADDON_MODULES and "common" not in ADDON_MODULES


def test_every_addon_option_is_namespaced():
    with taddons.context() as tctx:
        added = register_all(tctx)
    assert added
    assert [k for k in added if not k.startswith("openflare_")] == []


def test_mitm_conf_loads_with_nothing_left_over(model_conf, tmp_path):
    assert MITM_CONF.is_file()  # load_paths silently skips a missing file
    conf: Path = MITM_CONF
    if model_conf:  # a model other than the shipped one (OPENFLARE_TEST_MODEL): mitm.conf with that line changed
        conf = make_confdir(tmp_path, model_conf) / "config.yaml"
    with taddons.context() as tctx:
        register_all(tctx)
        optmanager.load_paths(tctx.options, conf)
        assert tctx.options.deferred, "mitm.conf should set mitmweb's web_columns"
        assert [k for k in tctx.options.deferred if not k.startswith("web_")] == []


def commented_options(text: str) -> dict:
    """Options documented but left unset (so `--set` or an env var can give them): `# openflare_x: value`."""
    found = {}
    for m in re.finditer(r"^#\s*(openflare_\w+):(.*)$", text, re.M):
        found[m.group(1)] = optmanager.parse(f"v: {m.group(2).strip() or 'null'}")["v"]
    return found


def test_mitm_conf_documents_every_option_with_its_default():
    text = MITM_CONF.read_text()
    data = optmanager.parse(text)
    documented = {**commented_options(text), **data}
    with taddons.context() as tctx:
        names = register_all(tctx)
        missing = [n for n in names if n not in documented]
        assert missing == [], f"options missing from mitm.conf: {missing}"
        for n in names:
            default = tctx.options._options[n].default
            value = documented[n]
            if isinstance(default, (list, tuple)):
                default, value = list(default), list(value)
            if n not in data and default is None:
                continue  # commented out with an example value: unset means the default (None)
            assert value == default, f"mitm.conf sets {n}: {value!r}, but its default is {default!r}"
    stale = [k for k in documented if k.startswith("openflare_") and k not in names]
    assert stale == [], f"mitm.conf names options no addon registers (ignored silently): {stale}"


def test_every_option_has_a_comment_in_mitm_conf():
    """Each option line sits under a comment (options documented together may share one)."""
    lines = MITM_CONF.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"openflare_\w+:", line):
            j = i - 1
            while j >= 0 and re.match(r"openflare_\w+:", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"mitm.conf: no comment above {line!r}"


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
