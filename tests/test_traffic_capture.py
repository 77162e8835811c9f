"""Opt-in capture of served prompts in the front model (python_backends/traffic_capture.py): absent unless enabled,
one bounded file per tenant, readable as a calibration file (`--calib`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tritonllm.contract import CacheSettings, SettingsError
from tritonllm.prompts import read_prompts
from tritonllm.python_backends.front import build_front
from tritonllm.python_backends.traffic_capture import TrafficCapture, capture_file_name


def _request(prompt: str, tenant: str | None = None, chat: bool | None = None) -> dict[str, np.ndarray]:
    arrays = {"text_input": np.array([prompt.encode()], dtype=np.object_), "max_tokens": np.array([[8]], np.int32)}
    if tenant is not None:
        arrays["tenant"] = np.array([tenant.encode()], dtype=np.object_)
    if chat is not None:
        arrays["apply_chat_template"] = np.array([[chat]], dtype=np.bool_)
    return arrays


def _parameters(**capture: str) -> dict[str, str]:
    return {"enabled": "false", "ensemble_model_name": "ensemble", "ensemble_inputs": "text_input,max_tokens",
            **capture}


def test_capture_is_absent_unless_enabled(tmp_path):
    front, _ = build_front(_parameters(), tmp_path)
    assert front.capture is None and CacheSettings().capture_dir == ""
    front.parse(_request("hello", "acme"))
    assert list(tmp_path.iterdir()) == []  # no folder, no file


def test_front_records_each_tenants_prompts_in_its_own_calibration_file(tmp_path):
    front, _ = build_front(_parameters(capture_dir="captured"), tmp_path)
    front.parse(_request("What is Triton?", "acme", chat=True))
    front.parse(_request("Once upon a time", "acme"))
    front.parse(_request("Bonjour, ça va ?", "globex", chat=True))
    folder = tmp_path / "captured"  # relative to the version folder
    assert sorted(p.name for p in folder.iterdir()) == sorted({capture_file_name("acme"), capture_file_name("globex")})
    assert read_prompts(folder / capture_file_name("acme")) == [("prompt", "What is Triton?"),
                                                                ("text", "Once upon a time")]
    assert read_prompts(folder / capture_file_name("globex")) == [("prompt", "Bonjour, ça va ?")]
    lines = [json.loads(line) for line in (folder / capture_file_name("globex")).read_text().splitlines()]
    assert lines == [{"prompt": "Bonjour, ça va ?", "tenant": "globex"}]


def test_a_bad_request_is_not_captured(tmp_path):
    from tritonllm.python_backends.errors import InvalidArgument

    front, _ = build_front(_parameters(capture_dir=str(tmp_path / "c")), tmp_path)
    with pytest.raises(InvalidArgument):
        front.parse({**_request("x", "acme"), "max_tokens": np.array([[0]], np.int32)})
    assert list((tmp_path / "c").iterdir()) == []


def test_files_are_bounded_by_lines_bytes_and_tenants(tmp_path):
    settings = CacheSettings(capture_dir=str(tmp_path), capture_max_lines=3, capture_max_bytes=200,
                             capture_max_tenants=2)
    capture = TrafficCapture(settings, tmp_path)
    assert [capture.record("a", f"prompt {i}", chat=True) for i in range(5)] == [True, True, True, False, False]
    assert capture.record("b", "x" * 150, chat=False) and not capture.record("b", "y" * 60, chat=False)  # bytes
    assert not capture.record("c", "a third tenant", chat=True)  # tenant bound
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([capture_file_name("a"), capture_file_name("b")])
    assert all(p.stat().st_size <= 200 for p in tmp_path.iterdir())
    assert len((tmp_path / capture_file_name("a")).read_text().splitlines()) == 3

    again = TrafficCapture(settings, tmp_path)  # after a restart the files already there count
    assert not again.record("a", "more", chat=True) and not again.record("c", "new tenant", chat=True)


def test_a_tenant_string_cannot_choose_the_path(tmp_path):
    capture = TrafficCapture(CacheSettings(capture_dir="c"), tmp_path)
    assert capture.record("../../etc/passwd", "p", chat=True)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [capture_file_name("../../etc/passwd")]


@pytest.mark.parametrize("field, value", [("capture_max_bytes", 0), ("capture_max_lines", 0),
                                          ("capture_max_tenants", 0), ("capture_dir", "a\nb")])
def test_capture_settings_are_validated(field, value):
    with pytest.raises(SettingsError, match=f"cache.{field}"):
        CacheSettings(**{field: value}).validate()

