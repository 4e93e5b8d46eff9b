"""``muse serve`` settings from a TOML file and flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from muse._config import ConfigError, load_settings

README_CONFIG = """
registry = "./muse-registry"

[server]
bind = "127.0.0.1:8000"
keep_alive_timeout = 30.0
header_timeout = 10.0
graceful_timeout = 10.0
max_connections = 4000
max_score_requests = 256
score_body_limit = 4194304
admin_body_limit = 268435456
score_body_timeout = 10.0
admin_body_timeout = 300.0

[engine]
deadline_ms = 100.0
max_events = 4096
live_queue = 2048
shadow_queue = 1024
persist_interval = 60.0
sample_capacity = 50000

[quotas."*"]
rate = 5000
burst = 10000
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "muse.toml"
    path.write_text(text)
    return path


def test_load_settings_reads_the_readme_example_and_flags_win(tmp_path: Path) -> None:
    path = _write(tmp_path, README_CONFIG)

    settings = load_settings(path, registry="/srv/reg", bind="127.0.0.1:9")

    assert settings.registry == "/srv/reg"
    assert settings.server.bind == "127.0.0.1:9"
    assert settings.server.max_connections == 4000
    assert settings.server.limits.score_body == 4194304
    assert settings.server.limits.admin_body_timeout == 300.0
    assert settings.engine["max_events"] == 4096
    assert settings.engine["quotas"]["*"].rate == 5000.0
    assert settings.engine["quotas"]["*"].burst == 10000.0


def test_load_settings_defaults_without_a_file() -> None:
    settings = load_settings(None)

    assert settings.registry == "./muse-registry"
    assert settings.server.bind == "127.0.0.1:8000"
    assert settings.engine == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[server]\nkeepalive_timeout = 5\n", r"\[server\]: unknown key\(s\) 'keepalive"),
        ("[engine]\nmax_event = 5\n", r"\[engine\]: unknown key\(s\) 'max_event'"),
        ("regisrty = 'x'\n", r"unknown key\(s\) 'regisrty'"),
        ('[quotas."*"]\nburst = 5\n', r"needs 'rate'"),
        ('[quotas."*"]\nrate = 5\nbrust = 1\n', r"unknown key\(s\) 'brust'"),
        ("[engine]\nmax_events = 'many'\n", r"\[engine\] max_events must be a number"),
        ("[engine]\nmax_events = 2.5\n", r"must be a whole number"),
        ("[engine]\ndeadline_ms = -1\n", r"deadline_ms must be positive"),
        ("[server]\nheader_timeout = true\n", r"header_timeout must be a number"),
        ("[server]\nbind = 8000\n", r"bind must be a string"),
        ("server = 3\n", r"\[server\] must be a table"),
        ("[server\n", r"cannot read configuration"),
    ],
)
def test_load_settings_names_the_key_at_fault(
    tmp_path: Path, text: str, match: str
) -> None:
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError, match=match) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False)])
def test_direct_lane_is_a_boolean_setting(
    tmp_path: Path, value: str, expected: bool
) -> None:
    settings = load_settings(_write(tmp_path, f"[server]\ndirect_lane = {value}\n"))

    assert settings.server.direct_lane is expected
    with pytest.raises(ConfigError, match="direct_lane must be true or false"):
        load_settings(_write(tmp_path, "[server]\ndirect_lane = 1\n"))


def test_muse_serve_reports_a_bad_key_without_a_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nkeepalive_timeout = 5\n")

    done = subprocess.run(
        [sys.executable, "-m", "muse", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    assert "unknown key(s) 'keepalive_timeout'" in done.stderr
    assert "Traceback" not in done.stderr
