"""addons/startup.py: --set wins over the options file, bad openflare_* keys stop startup, reported once.

Unit tests replay what mitmproxy's main does (`opts.set(..., defer=True)`, then the file) on a test
context; the end-to-end ones start real mitmdumps (the bundle, addons alone, and `make run`).
"""

import asyncio
import logging
import subprocess
import sys

import pytest
from mitmproxy import optmanager
from mitmproxy.test import taddons

from addons import common
from addons import startup
from conftest import MAKE
from conftest import REPO
from conftest import free_port
from conftest import http_request
from conftest import make_confdir
from conftest import wait_listening

SQLI = "/?id=1%27%20OR%20%271%27=%271"
CLEAN = {"OPENFLARE_REDIS_URL": "", "OPENFLARE_MONGO_URI": ""}


def as_mitmproxy_starts(opts, confdir, argv: list[str]) -> None:
    """mitmproxy's main: the command line's --set first (unknown keys deferred), then the confdir's file."""
    specs = [s for group in startup.command_line_sets(argv).values() for s in group]
    opts.set(*specs, defer=True)
    optmanager.load_paths(opts, confdir / "config.yaml")


class OptionsOf:
    """Registers an addon's options (its load hook) and nothing else: no configure, no state."""

    def __init__(self, addon) -> None:
        self.addon = addon
        self.name = f"options-of-{type(addon).__name__.lower()}"

    def load(self, loader) -> None:
        self.addon.load(loader)


def test_command_line_sets():
    argv = ["-p", "8080", "--set", "a=1", "--set=b=2", "-s", "x.py", "--set", "a=3", "--mode", "reverse:http://h:1",
            "--set", "flag", "-q"]  # fmt: skip
    assert startup.command_line_sets(argv) == {"a": ["a=1", "a=3"], "b": ["b=2"], "flag": ["flag"]}
    assert startup.command_line_sets(["--setx", "a=1", "-s", "--set"]) == {}


def test_file_keys_later_file_wins(tmp_path):
    (tmp_path / "config.yaml").write_text("a: 1\nb: 2\n")
    (tmp_path / "config.yml").write_text("b: 3\n")
    got = startup.file_keys(str(tmp_path))
    assert got == {"a": (1, tmp_path / "config.yaml"), "b": (3, tmp_path / "config.yml")}
    assert startup.file_keys(str(tmp_path / "missing")) == {}


def test_flags_win_over_the_file_for_every_key(tmp_path, caplog):
    confdir = make_confdir(tmp_path, {"openflare_threshold": 9, "openflare_allowlist": ["10.0.0.0/8"],
                                      "listen_port": 1111, "openflare_strikes": 4})  # fmt: skip
    argv = ["--set", "openflare_threshold=7", "--set", "openflare_allowlist=192.0.2.1", "--set",
            "openflare_allowlist=192.0.2.2", "--set", "listen_port=2222"]  # fmt: skip
    with taddons.context() as tctx:
        opts = tctx.options
        as_mitmproxy_starts(opts, confdir, argv)
        assert opts.listen_port == 1111 and opts.deferred["openflare_threshold"] == 9  # mitmproxy: the file won
        caplog.set_level(logging.INFO)
        both = startup.flags_win(opts, startup.file_keys(str(confdir)), startup.command_line_sets(argv))
        assert sorted(both) == ["listen_port", "openflare_allowlist", "openflare_threshold"]
        assert opts.listen_port == 2222
        from addons import bans, scorer

        tctx.master.addons.add(OptionsOf(scorer.Scorer()), OptionsOf(bans.IpBans()))
        assert opts.openflare_threshold == 7
        assert opts.openflare_allowlist == ["192.0.2.1", "192.0.2.2"]
        assert opts.openflare_strikes == 4  # only in the file: the file's
    assert "--set openflare_threshold=7 wins over 9 in" in caplog.text


def test_bad_deferred_keys_are_errors_naming_the_nearest(tmp_path, caplog):
    confdir = make_confdir(tmp_path, {"openflare_treshold": 9, "openflare_strikes": "three", "openflare_threshold": 8})
    argv = ["--set", "openflare_ban_secnds=5", "--set", "openflare_rate_limit=lots", "--set", "openflare_detect_only"]
    with taddons.context() as tctx:
        opts = tctx.options
        as_mitmproxy_starts(opts, confdir, argv)
        bad = startup.check_deferred(opts, startup.file_keys(str(confdir)), startup.command_line_sets(argv))
        assert bad == ["openflare_ban_secnds", "openflare_rate_limit", "openflare_strikes", "openflare_treshold"]
        # bad values are dropped (mitmproxy would stop on them with a traceback); good ones stay deferred
        assert sorted(k for k in opts.deferred) == ["openflare_ban_secnds", "openflare_detect_only",
                                                    "openflare_threshold", "openflare_treshold"]  # fmt: skip
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4
    assert any(f"in {confdir / 'config.yaml'}: unknown option openflare_treshold (did you mean openflare_threshold?)" in e for e in errors)
    assert any("on the command line (--set): unknown option openflare_ban_secnds (did you mean openflare_ban_seconds?)" in e for e in errors)
    assert any("openflare_strikes: 'three' is not of type int" in e for e in errors)
    assert any("not an integer: lots" in e for e in errors)


async def test_report_after_load_warns_about_unloaded_addons(tmp_path, caplog):
    """install() end to end on a test context: the report runs on the next loop turn, after the addons load."""
    confdir = make_confdir(tmp_path, {"openflare_threshold": 9, "openflare_strikes": 5})
    argv = ["mitmdump", "--set", "openflare_threshold=10"]
    from addons import scorer

    caplog.set_level(logging.INFO)
    with taddons.context() as tctx:
        tctx.options.update(confdir=str(confdir))
        as_mitmproxy_starts(tctx.options, confdir, argv[1:])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", argv)
            startup.install(tctx.master)
        tctx.master.addons.add(OptionsOf(scorer.Scorer()))  # the scorer's options, not the bans'
        await asyncio.sleep(0)
        assert tctx.options.openflare_threshold == 10
    text = caplog.text
    assert "openflare_strikes is set in" in text and "addons/bans.py, which reads it, is not loaded" in text
    assert "OpenFlare options in force (not the defaults): openflare_threshold=10 (--set)" in text
    assert "ERROR" not in text


def test_flags_are_not_read_outside_mitmproxy(tmp_path, monkeypatch):
    """Under another program (pytest, an embedding app) sys.argv's --set are not mitmproxy's."""
    confdir = make_confdir(tmp_path, {"openflare_threshold": 9})
    monkeypatch.setattr(sys, "argv", ["someapp", "--set", "openflare_threshold=7"])
    with taddons.context() as tctx:
        tctx.options.update(confdir=str(confdir))
        optmanager.load_paths(tctx.options, confdir / "config.yaml")
        startup.install(tctx.master)
        assert tctx.options.deferred["openflare_threshold"] == 9


# --- real mitmdump ---------------------------------------------------------------------------------


def start(processes, tmp_path_factory, scripts, conf=None, options=None, upstream=None, wait=False):
    from conftest import mitmdump_args

    port = free_port()
    records = tmp_path_factory.mktemp("records")
    opts = {"openflare_record_dir": str(records / "store"), "openflare_record_spill": str(records / "s.jsonl"),
            **(options or {})}  # fmt: skip
    mode = f"reverse:{upstream.url}" if upstream else None
    args = mitmdump_args(port, make_confdir(tmp_path_factory.mktemp("confdir"), conf), scripts, mode, opts)
    return processes.start("mitmdump", args, port if wait else None, env=CLEAN, wait=wait)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "scripts, conf, options, where",
    [
        (["addons/openflare.py"], {"openflare_treshold": 9}, {}, "config.yaml"),
        (["addons/features.py"], {}, {"openflare_treshold": 9}, "on the command line (--set)"),
        (["addons/features.py", "addons/scorer.py"], {"openflare_treshold": 9}, {}, "config.yaml"),
    ],
    ids=["bundle, file", "one addon, --set", "two addons, file"],
)
def test_typo_stops_startup_naming_the_nearest_once(processes, tmp_path_factory, model_conf, scripts, conf, options, where):
    proc = start(processes, tmp_path_factory, scripts, {**model_conf, **conf}, options)
    assert proc.wait(timeout=90) != 0
    stdout, stderr = proc.output()
    assert "Error logged during startup" in stderr
    msg = "unknown option openflare_treshold (did you mean openflare_threshold?)"
    assert stdout.count(msg) == 1, stdout
    assert where in stdout.split(msg)[0].rsplit("\n", 1)[-1]
    assert "Traceback" not in stdout + stderr


@pytest.mark.e2e
def test_wrong_type_stops_startup_without_a_traceback(processes, tmp_path_factory, model_conf):
    proc = start(processes, tmp_path_factory, ["addons/openflare.py"], {**model_conf, "openflare_strikes": "three"})
    assert proc.wait(timeout=90) != 0
    stdout, stderr = proc.output()
    assert "openflare_strikes: 'three' is not of type int" in stdout
    assert "Traceback" not in stdout + stderr


@pytest.mark.e2e
def test_set_wins_over_the_file_in_mitmdump(processes, tmp_path_factory, upstream, model_conf):
    """The file pins threshold 6, --set lifts it to 10: the attack is served, as the flag says."""
    conf = {**model_conf, "openflare_threshold": 6}
    pinned = start(processes, tmp_path_factory, ["addons/openflare.py"], conf, upstream=upstream, wait=True)
    assert http_request(pinned.port, "GET", SQLI)[0] == common.BLOCK_STATUS
    lifted = start(processes, tmp_path_factory, ["addons/openflare.py"], conf, {"openflare_threshold": 10},
                   upstream=upstream, wait=True)  # fmt: skip
    assert http_request(lifted.port, "GET", SQLI)[0] == 200
    stdout, _ = lifted.output()
    assert "--set openflare_threshold=10 wins over 6 in" in stdout
    assert "openflare_threshold=10 (--set)" in stdout


@pytest.mark.e2e
def test_make_run_args_set_the_threshold(processes, upstream, model_path, tmp_path_factory):
    """`make run ARGS="--set openflare_threshold=..."` over the user's mitm.conf, whatever it says."""
    port = free_port()
    records = tmp_path_factory.mktemp("records")
    args = " ".join([
        "--set openflare_threshold=10", f"--set openflare_model={model_path}", "--set openflare_record=false",
        f"--set openflare_record_dir={records}", f"--set openflare_record_spill={records / 's.jsonl'}",
    ])  # fmt: skip
    proc = processes.start("make", [*MAKE, "run", f"PORT={port}", f"UPSTREAM={upstream.url}", f"ARGS={args}"],
                           env=CLEAN)  # fmt: skip
    if not wait_listening(port, proc.popen):
        proc.stop()
        pytest.fail("make run did not listen:\n" + "\n".join(proc.output()))
    assert http_request(port, "GET", SQLI)[0] == 200  # threshold 10: nothing is refused by its score
    assert http_request(port, "GET", "/search?q=blue+shoes")[0] == 200
    stdout, _ = proc.output()
    assert "OpenFlare options in force (not the defaults): " in stdout
    assert "openflare_threshold=10 (--set)" in stdout
    proc.stop()


def test_check_config_target_uses_the_same_check(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("openflare_treshold: 9\n")
    out = subprocess.run([*MAKE, "check-config", f"FILE={conf}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown option openflare_treshold (did you mean openflare_threshold?)" in out.stderr
