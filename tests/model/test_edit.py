"""mcie edit end to end on CPU: tiny MCIE-E1 weights saved to disk, given or MLLM-decomposed sub-instructions (a fake
OpenAI-compatible server), the plain InstructPix2Pix fallback, batches from JSONL, and the errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from mcie.cli import app
from mcie.model.evaluate import EvalError, SubSpec, parse_sub
from mcie.model.pipeline import MCIEPipeline
from mcie.model.weights import save_weights
from tests.mcie.mllm.chat_server import RecordedRequest, chat_server
from tests.model.tiny import (
    TINY_IMAGE,
    TinyFiles,
    load_tiny_model,
    make_tiny_files,
    randomize_trained,
    tiny_config,
    tiny_images,
)

# diffusers' Euler schedulers call np.array(tensor, copy=False) internally (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
runner = CliRunner()
STEPS = "2"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def weights(files: TinyFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained-looking tiny MCIE-E1 weights whose config names the vision checkpoint (as training writes it)."""
    model = load_tiny_model(files, tiny_config(clip_vision_checkpoint=str(files.vision)))
    randomize_trained(model)
    return save_weights(model, tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "source.png"
    tiny_images(1, seed=5)[0].save(path)
    return path


def configure(monkeypatch: pytest.MonkeyPatch, **env: Any) -> None:
    from mcie.config import get_settings

    for key, value in env.items():
        monkeypatch.setenv(f"MCIE_{key.upper()}", str(value))
    get_settings.cache_clear()


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["edit", *args], catch_exceptions=False)


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_sub_option_parsing() -> None:
    assert parse_sub("add a cat|add|0.1,0.2,0.5,0.6") == SubSpec("add a cat", "add", (0.1, 0.2, 0.5, 0.6))
    assert parse_sub(" make the sky blue | Change ") == SubSpec("make the sky blue", "change", None)
    assert parse_sub("remove the dog||0,0,1,1") == SubSpec("remove the dog", None, (0.0, 0.0, 1.0, 1.0))
    assert parse_sub("just text") == SubSpec("just text")
    for bad, message in (("|add|0,0,1,1", "expected"), ("a|paint", "'paint' is not one of"),
                         ("a|add|0,0,1", "expected 4 numbers"), ("a|add|0.5,0,0.2,1", "x0 < x1"),
                         ("a|add|0,0,2,1", "normalised"), ("a|add|x,0,1,1", "four numbers"),
                         ("a|add|0,0,1,1|more", "expected")):
        with pytest.raises(EvalError, match=message):
            parse_sub(bad)


def test_edit_with_given_sub_instructions_matches_the_pipeline(files: TinyFiles, weights: Path, source: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    configure(monkeypatch, editing_base_model_path=files.base, editing_weights_path=weights)
    out = tmp_path / "edited.png"
    result = invoke("--image", str(source), "--instruction", "add a cat and make the sky blue",
                    "--sub", "add a cat|add|0.1,0.5,0.5,0.9", "--sub", "make the sky blue|change",
                    "--steps", STEPS, "--seed", "3", "--resolution", str(TINY_IMAGE), "--out", str(out),
                    "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"] == "mcie-e1" and summary["steps"] == 2 and summary["seed"] == 3
    assert summary["edits"][0]["sub_instructions"] == [{"text": "add a cat", "box": [0.1, 0.5, 0.5, 0.9]},
                                                       {"text": "make the sky blue", "box": None}]
    pipe = MCIEPipeline.from_pretrained(files.base, weights=weights)
    from PIL import Image

    expected = pipe(Image.open(source).convert("RGB"), "add a cat and make the sky blue",
                    sub_instructions=[("add a cat", (0.1, 0.5, 0.5, 0.9)), ("make the sky blue", None)],
                    num_inference_steps=2, seed=3).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))
    other = invoke("--image", str(source), "--instruction", "add a cat and make the sky blue", "--no-decompose",
                   "--steps", STEPS, "--seed", "3", "--out", str(tmp_path / "plain.png"),
                   "--resolution", "32")
    assert other.exit_code == 0, other.stderr
    assert "sub-instructions: none" in other.stdout
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(out))


def test_edit_decomposes_through_the_configured_mllm(files: TinyFiles, weights: Path, source: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    frames: list[tuple[int, int]] = []

    def answer(request: RecordedRequest) -> str:
        width, height = (int(v) for v in re.search(r"The image is (\d+)x(\d+) pixels", "".join(request.texts()))
                         .groups())
        frames.append((width, height))
        return json.dumps({"edits": [
            {"instruction": "add a red apple", "operation": "add", "bbox_2d": [0, height // 2, width // 2, height]},
            {"instruction": "remove the cup", "operation": "remove", "bbox_2d": [width // 2, 0, width, height // 2]},
        ]})

    with chat_server(answer) as server:
        configure(monkeypatch, editing_base_model_path=files.base, editing_weights_path=weights,
                  mllm_backend="openai", mllm_base_url=server.base_url, mllm_max_retries=0)
        out = tmp_path / "edited.png"
        result = invoke("--image", str(source), "--instruction", "add a red apple and remove the cup",
                        "--steps", STEPS, "--resolution", "32", "--out", str(out), "--json")
        assert result.exit_code == 0, result.stderr
        assert len(server.requests) == 1 and len(server.requests[0].images()) == 1
        assert 'Instruction: "add a red apple and remove the cup"' in "".join(server.requests[0].texts())
    used = json.loads(result.stdout)["edits"][0]["sub_instructions"]
    assert [u["text"] for u in used] == ["add a red apple", "remove the cup"]
    width, height = frames[0]
    assert used[0]["box"] == pytest.approx([0, (height // 2) / height, (width // 2) / width, 1], abs=1e-6)
    assert used[1]["box"] == pytest.approx([(width // 2) / width, 0, 1, (height // 2) / height], abs=1e-6)
    assert pixels(out).shape == (TINY_IMAGE, TINY_IMAGE, 3)

    with chat_server("I cannot help with that.") as server:
        configure(monkeypatch, mllm_base_url=server.base_url)
        failed = invoke("--image", str(source), "--instruction", "add a red apple", "--steps", STEPS,
                        "--out", str(tmp_path / "x.png"))
    assert failed.exit_code == 1 and "DecompositionError" in failed.stderr and not (tmp_path / "x.png").exists()


def test_errors_come_before_loading_anything(files: TinyFiles, weights: Path, source: Path, tmp_path: Path,
                                             monkeypatch) -> None:
    out = str(tmp_path / "o.png")
    result = invoke("--image", str(source), "--instruction", "add a cat", "--out", out)
    assert result.exit_code == 2 and "MCIE_EDITING_BASE_MODEL_PATH" in result.stderr
    configure(monkeypatch, editing_base_model_path=files.base, editing_weights_path=weights)
    result = invoke("--image", str(source), "--instruction", "add a cat", "--out", out)
    assert result.exit_code == 2
    assert "no MLLM is configured" in result.stderr and "MCIE_MLLM_BACKEND" in result.stderr
    assert "--sub" in result.stderr
    result = invoke("--image", str(source), "--instruction", "add a cat", "--sub", "a|paint", "--out", out)
    assert result.exit_code == 2 and "'paint' is not one of add, remove, change" in result.stderr
    result = invoke("--image", str(tmp_path / "none.png"), "--instruction", "x", "--out", out)
    assert result.exit_code == 2 and "none.png: no such file" in result.stderr
    result = invoke("--instruction", "x", "--out", out)
    assert result.exit_code == 2 and "either --image" in result.stderr
    configure(monkeypatch, editing_weights_path=tmp_path / "no-weights")
    result = invoke("--image", str(source), "--instruction", "add a cat", "--out", out)
    assert result.exit_code == 2 and "no-weights" in result.stderr
    assert not Path(out).exists()


def test_without_weights_it_is_plain_instruct_pix2pix(files: TinyFiles, source: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    configure(monkeypatch, editing_base_model_path=files.base)
    out = tmp_path / "ip2p.png"
    result = invoke("--image", str(source), "--instruction", "make it red", "--steps", STEPS, "--seed", "1",
                    "--resolution", "32", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "plain InstructPix2Pix" in result.stderr and "(instructpix2pix;" in result.stdout
    from PIL import Image

    expected = MCIEPipeline.from_pretrained(files.base)(Image.open(source).convert("RGB"), "make it red",
                                                       num_inference_steps=2, seed=1).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected))


def test_batch_mode_from_jsonl(files: TinyFiles, weights: Path, source: Path, tmp_path: Path, monkeypatch) -> None:
    configure(monkeypatch, editing_base_model_path=files.base, editing_weights_path=weights)
    jobs = tmp_path / "jobs" / "jobs.jsonl"
    jobs.parent.mkdir()
    tiny_images(1, seed=6)[0].resize((64, 40)).save(jobs.parent / "wide.png")
    lines = [
        {"id": "a", "source": str(source), "instruction": "add a dog",
         "sub_instructions": [{"text": "add a dog", "operation": "add", "box": [0.2, 0.2, 0.7, 0.9]}]},
        {"id": "b-2", "source": {"path": "wide.png"}, "instruction": "make it night", "sub_instructions": [],
         "seed": 7},
    ]
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    result = invoke("--batch", str(jobs), "--out-dir", str(out), "--steps", STEPS, "--resolution", "32", "--json")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)["edits"]
    assert [r["id"] for r in records] == ["a", "b-2"] and not any(r["skipped"] for r in records)
    assert records[0]["sub_instructions"] == [{"text": "add a dog", "box": [0.2, 0.2, 0.7, 0.9]}]
    assert pixels(out / "a.png").shape == (32, 32, 3)
    assert pixels(out / "b-2.png").shape == (32, 48, 3)  # shorter side 32, sides multiples of 8
    again = invoke("--batch", str(jobs), "--out-dir", str(out), "--steps", STEPS, "--resolution", "32")
    assert again.exit_code == 0 and again.stdout.count("kept existing") == 2

    jobs.write_text(json.dumps({"id": "bad id", "source": str(source), "instruction": "x"}) + "\n")
    result = invoke("--batch", str(jobs), "--out-dir", str(out))
    assert result.exit_code == 2 and "jobs.jsonl:1: id" in result.stderr
