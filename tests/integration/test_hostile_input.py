"""Issue 19 through the Python API: the rules of the command line hold for a Machine too."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvmm import Machine
from kvmm.errors import ConfigError

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, -1.5, True, "5"])
def test_every_time_limit_rejects_nan_inf_and_non_positive_values(value: object, guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with Machine(kernel=str(guests("serial_hello")), mem="16M", console_file=str(tmp_path / "c")) as m:
        with pytest.raises(ConfigError):
            m.run(timeout=value)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            m.launch(timeout=value)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            m.console.expect("hello", timeout=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, -1.5, True, "5"])
def test_check_seconds_takes_finite_positive_numbers_only(value: object) -> None:
    from kvmm.config import check_seconds

    with pytest.raises(ConfigError, match="finite number of seconds above 0"):
        check_seconds(value)  # type: ignore[arg-type]
    assert check_seconds(None) is None and check_seconds(2) == 2.0


@pytest.mark.parametrize("options,match", [
    ({"mem": 1025 << 10}, "not a multiple of 4 KiB"),
    ({"api_socket": ""}, "is empty"),
    ({"api_socket": "/tmp/" + "s" * 103}, "at most 107"),
    ({"cmdline": "quiet \udcff"}, "not UTF-8"),
])
def test_machine_options_are_checked_as_the_command_line_checks_them(options: dict, match: str, guests, tmp_path: Path) -> None:  # type: ignore[no-untyped-def,type-arg]
    with pytest.raises(ConfigError, match=match):
        Machine(kernel=str(guests("serial_hello")), console_file=str(tmp_path / "c"), **{"mem": "16M", **options})
