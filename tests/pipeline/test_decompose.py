"""``mcie pipeline decompose``: a complex instruction split into (sub-instruction, operation, box) by the MLLM."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from mcie.cli import app
from mcie.config import get_settings
from tests.mcie.mllm.chat_server import chat_server

runner = CliRunner()


def test_decompose_command_prints_normalized_boxes(tmp_path: Path, monkeypatch) -> None:
    image = tmp_path / "street.png"
    Image.new("RGB", (640, 480), (90, 120, 200)).save(image)

    def answer(request) -> str:
        text = "\n".join(request.texts())
        assert "put a red car on the road and remove the tree" in text
        width, height = request.images()[0].size
        return "Sure!\n```json\n" + json.dumps({"edits": [
            {"instruction": "put a red car on the road", "operation": "add",
             "bbox_2d": [0.1 * width, 0.6 * height, 0.5 * width, 0.9 * height]},
            {"instruction": "remove the tree", "operation": "remove",
             "bbox_2d": [0.7 * width, 0.1 * height, 0.95 * width, 0.8 * height]},
        ]}) + "\n```"

    with chat_server(answer) as server:
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        result = runner.invoke(app, ["pipeline", "decompose", "--image", str(image), "--mllm", "openai",
                                     "--instruction", "put a red car on the road and remove the tree"])
    assert result.exit_code == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert [e["operation"] for e in out["edits"]] == ["add", "remove"]
    car = out["edits"][0]["box"]
    assert abs(car[0] - 0.1) < 0.02 and abs(car[1] - 0.6) < 0.02 and abs(car[2] - 0.5) < 0.02
    assert out["prompt_version"].startswith("decompose-")


def test_decompose_needs_an_mllm_and_a_readable_image(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    result = runner.invoke(app, ["pipeline", "decompose", "--image", str(image), "--instruction", "make it red"])
    assert result.exit_code == 2 and "MCIE_MLLM_BACKEND" in result.stderr
    (tmp_path / "bad.png").write_text("nope")
    result = runner.invoke(app, ["pipeline", "decompose", "--image", str(tmp_path / "bad.png"), "--instruction", "x"])
    assert result.exit_code == 2 and "bad.png" in result.stderr


def test_decompose_reports_an_unreadable_answer(tmp_path: Path, monkeypatch) -> None:
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    with chat_server("I would rather not.") as server:
        monkeypatch.setenv("MCIE_MLLM_BACKEND", "openai")
        monkeypatch.setenv("MCIE_MLLM_BASE_URL", server.base_url)
        get_settings.cache_clear()
        result = runner.invoke(app, ["pipeline", "decompose", "--image", str(image), "--instruction", "make it red"])
    assert result.exit_code == 1 and "could not be parsed" in result.stderr
