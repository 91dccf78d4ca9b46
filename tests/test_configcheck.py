"""addons/configcheck.py: an options file and --set arguments checked as mitmdump reads them."""

import pytest

from addons import configcheck
from conftest import MITM_CONF


def run(capsys, *argv) -> tuple[int, str, str]:
    code = configcheck.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_file_is_clean(capsys):
    code, out, err = run(capsys, str(MITM_CONF))
    assert (code, err) == (0, "")
    assert out.startswith(f"{MITM_CONF}: OK.")


def test_every_openflare_addon_is_registered():
    from addons import common

    found = configcheck.openflare_options()
    assert set(found.values()) == set(common.ADDON_ORDER)
    assert found["openflare_threshold"] == "addons/scorer.py"
    assert found["openflare_view_max_flows"] == "addons/flowcap.py"
    opts = configcheck.all_options()
    assert {"block_global", "web_columns", "web_port", "console_layout", "mode", *found} <= opts.keys()


@pytest.mark.parametrize(
    "typo, near",
    [
        ("openflare_treshold", "openflare_threshold"),
        ("openflare_redis_ulr", "openflare_redis_url"),
        ("openflare_view_max_flow", "openflare_view_max_flows"),
        ("block_globl", "block_global"),
        ("web_colums", "web_columns"),
    ],
)
def test_unknown_key_names_the_nearest(tmp_path, capsys, typo, near):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"{typo}: 9\n")
    code, out, err = run(capsys, str(conf))
    assert code == 2
    assert f"{conf}: unknown option {typo} (did you mean {near}?)" in err
    assert out == ""


def test_nearest():
    names = ["openflare_threshold", "openflare_strikes", "block_global"]
    assert configcheck.nearest("openflare_treshold", names) == "openflare_threshold"
    assert configcheck.nearest("openflare_x", ["openflare_xy", "openflare"]) == "openflare_xy"
    assert configcheck.nearest("zzzzzz", names) is None
    assert "no option has a similar name" in configcheck.unknown("zzzzzz", names)


def test_type_and_choice_errors_each_reported(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("openflare_strikes: three\nopenflare_fail: clsed\nopenflare_headers: user-agent\nopenflare_threshold: 7\n")
    code, _, err = run(capsys, str(conf))
    assert code == 2
    assert "openflare_strikes" in err and "three" in err
    assert "openflare_fail: 'clsed' is not one of open, closed (did you mean closed?)" in err
    assert "openflare_headers" in err  # a string where a list of strings goes
    assert "openflare_threshold" not in err
    assert "3 problems" in err


def test_set_arguments_are_checked_as_mitmdump_parses_them(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("openflare_threshold: 9\n")
    code, out, _ = run(capsys, str(conf), "--set", "openflare_threshold=7", "--set", "openflare_allowlist=10.0.0.0/8",
                       "--set", "openflare_allowlist=192.0.2.1")  # fmt: skip
    assert code == 0
    assert "openflare_threshold=7" in out  # the flag wins over the file
    assert "openflare_allowlist=['10.0.0.0/8', '192.0.2.1']" in out
    code, _, err = run(capsys, str(conf), "--set", "openflare_threshold=high", "--set", "openflare_tresh=1")
    assert code == 2
    assert "not an integer: high" in err
    assert "--set: unknown option openflare_tresh (did you mean openflare_threshold?)" in err


def test_yaml_error_and_missing_file(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("openflare_threshold: [9\n")
    code, _, err = run(capsys, str(conf))
    assert code == 2 and "Config error" in err
    code, _, err = run(capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such file" in err


def test_passwords_in_urls_are_masked(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("openflare_mongo_uri: mongodb://app:s3cret@db:27017/openflare\n")
    code, out, _ = run(capsys, str(conf))
    assert code == 0
    assert "s3cret" not in out and "mongodb://app:***@db:27017/openflare" in out
