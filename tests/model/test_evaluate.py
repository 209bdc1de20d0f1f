"""mcie eval: pure metrics on known cases, CLIP-I / DINO-I with tiny random models loaded from saved checkpoints, the
IC / BC judge through a fake OpenAI-compatible server, benchmark errors, and the command end to end (with a model
editing the benchmark on the fly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mcie.cli import app
from mcie.model.evaluate import (
    ClipImageEncoder,
    DinoImageEncoder,
    EvalError,
    cosine_similarity,
    judge_edits,
    l1_distance,
    l2_distance,
    load_bench,
    to_unit_array,
)
from tests.mcie.mllm.chat_server import RecordedRequest, chat_server
from tests.model.tiny import TinyFiles, load_tiny_model, make_tiny_files, randomize_trained, tiny_config, tiny_images
from tests.tiny_clip import TINY_CLIP_NAME, register_tiny_clip, save_tiny_clip

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
runner = CliRunner()
JUDGE_ANSWER = '{"reason": "fine", "instruction_compliance": 8, "background_consistency": 4}'


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    register_tiny_clip()
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip.safetensors", seed=2)


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, patch_size=8, image_size=32))
    folder = tmp_path_factory.mktemp("dino") / "dinov2-tiny"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three items; outputs "perfect" (= targets) for all, "lazy" (= sources) for two of them."""
    root = tmp_path_factory.mktemp("bench")
    images = tiny_images(6, seed=11)
    (root / "bench" / "images").mkdir(parents=True)
    lines = []
    for i in range(3):
        images[i].save(root / "bench" / "images" / f"{i}_src.png")
        images[3 + i].save(root / "bench" / "images" / f"{i}_tgt.png")
        subs = [{"text": f"add a hat number {i}", "operation": "add", "box": [0.1, 0.1, 0.4, 0.5]},
                {"text": "remove the lamp", "operation": "remove", "box": None}]
        lines.append({"id": str(i), "source": f"images/{i}_src.png", "target": f"images/{i}_tgt.png",
                      "instruction": f"add a hat number {i} and remove the lamp", "sub_instructions": subs})
    (root / "bench" / "bench.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    for name, offset, count in (("perfect", 3, 3), ("lazy", 0, 2)):
        (root / name).mkdir()
        for i in range(count):
            images[offset + i].save(root / name / f"{i}.png")
    return root


def configure(monkeypatch: pytest.MonkeyPatch, **env: Any) -> None:
    from mcie.config import get_settings

    for key, value in env.items():
        monkeypatch.setenv(f"MCIE_{key.upper()}", str(value))
    get_settings.cache_clear()


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["eval", *args], catch_exceptions=False)


# --------------------------------------------------------------------------------------------------------------
# pure metrics


def test_pixel_metrics_on_known_cases() -> None:
    a = np.zeros((2, 2, 3))
    b = np.full((2, 2, 3), 0.5)
    assert l1_distance(a, a) == 0 and l2_distance(a, a) == 0
    assert l1_distance(a, b) == pytest.approx(0.5) and l2_distance(a, b) == pytest.approx(0.25)
    c = a.copy()
    c[0, 0, 0] = 1.0  # one value of twelve differs by 1, another by 0.25
    c[1, 1, 2] = 0.25
    assert l1_distance(a, c) == pytest.approx(1.25 / 12) and l2_distance(a, c) == pytest.approx(1.0625 / 12)
    with pytest.raises(ValueError, match="shapes differ"):
        l1_distance(a, np.zeros((2, 3, 3)))
    black, white = Image.new("RGB", (40, 24), (0, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255))
    assert to_unit_array(black, 16).shape == (16, 16, 3)
    assert l1_distance(to_unit_array(black, 16), to_unit_array(white, 16)) == pytest.approx(1.0)
    assert l2_distance(to_unit_array(black, 16), to_unit_array(white, 16)) == pytest.approx(1.0)
    gray = Image.new("RGB", (8, 8), (51, 102, 255))
    assert to_unit_array(gray, 8)[3, 3] == pytest.approx([0.2, 0.4, 1.0])
    image = tiny_images(1)[0]
    assert l1_distance(to_unit_array(image, 32), to_unit_array(image.copy(), 32)) == 0


def test_cosine_similarity() -> None:
    assert cosine_similarity([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert cosine_similarity([1.0, 0.0], [0.0, 5.0]) == pytest.approx(0.0)
    assert cosine_similarity(torch.tensor([1.0, 1.0]), np.array([-2.0, -2.0])) == pytest.approx(-1.0)
    assert cosine_similarity([3.0, 4.0], [4.0, 3.0]) == pytest.approx(24 / 25)
    assert cosine_similarity([0.0, 0.0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_similarity([1.0], [1.0, 2.0])


# --------------------------------------------------------------------------------------------------------------
# embedding models and the judge


def test_clip_and_dino_embeddings_from_saved_checkpoints(clip_checkpoint: Path, dino_folder: Path,
                                                         tmp_path: Path) -> None:
    a, b = tiny_images(2, seed=9)
    for encoder in (ClipImageEncoder(TINY_CLIP_NAME, clip_checkpoint, "cpu"), DinoImageEncoder(dino_folder, "cpu", 32)):
        embeddings = encoder.embed([a, a.copy(), b])
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert cosine_similarity(embeddings[0], embeddings[1]) == pytest.approx(1.0, abs=1e-6)
        assert cosine_similarity(embeddings[0], embeddings[2]) < 0.9999
    clip = ClipImageEncoder(TINY_CLIP_NAME, clip_checkpoint, "cpu")
    other = ClipImageEncoder(TINY_CLIP_NAME, save_tiny_clip(tmp_path / "other.safetensors", seed=3), "cpu")
    assert not torch.allclose(clip.embed([a]), other.embed([a]))  # the checkpoint's weights are really loaded
    dino = DinoImageEncoder(dino_folder, "cpu", crop=32)
    pixels = dino.pixels(Image.new("RGB", (50, 40), (124, 116, 104)))
    assert pixels.shape == (3, 32, 32)
    expected = [(v / 255 - m) / s for v, m, s in zip((124, 116, 104), dino.MEAN, dino.STD, strict=True)]
    assert pixels[:, 5, 7] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(EvalError, match=r"missing\.pt' is neither an existing local path nor a Hugging Face Hub id"):
        ClipImageEncoder(TINY_CLIP_NAME, tmp_path / "missing.pt")
    with pytest.raises(EvalError, match=r"no config\.json"):
        DinoImageEncoder(tmp_path)


def test_judge_through_the_chat_server() -> None:
    from mcie.mllm.openai_backend import OpenAIBackend

    source, edited = tiny_images(2, seed=4)

    def answer(request: RecordedRequest) -> str:
        text = "".join(request.texts())
        return JUDGE_ANSWER if "good edit" in text else "the edit looks nice"

    with chat_server(answer) as server, OpenAIBackend(server.base_url, "judge-model") as backend:
        scores = judge_edits(backend, [(source, edited, "good edit please"), (source, edited, "other edit")])
        assert len(server.requests[0].images()) == 2
    assert scores[0] == pytest.approx((0.8, 0.8))
    assert isinstance(scores[1], str) and scores[1].startswith("unreadable answer")


def test_bench_errors_name_the_line_and_key(bench: Path, tmp_path: Path) -> None:
    items = load_bench(bench / "bench")
    assert [item.id for item in items] == ["0", "1", "2"]
    assert items[0].sub_instructions is not None and items[0].sub_instructions[0].box == (0.1, 0.1, 0.4, 0.5)
    good = json.loads((bench / "bench" / "bench.jsonl").read_text().splitlines()[0])
    cases = [
        ({**good, "source": "images/none.png"}, "source: .*none.png not found"),
        ({**good, "sub_instructions": [{"text": "x", "operation": "add", "box": [0.5, 0, 0.2, 1]}]},
         r"sub_instructions\[0\]\.box: expected x0 < x1"),
        ({**good, "sub_instructions": [{"text": "x", "operation": "paint"}]},
         r"sub_instructions\[0\]\.operation: 'paint' is not one of"),
        ({**good, "instruction": ""}, "instruction: expected a non-empty string"),
    ]
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "images").symlink_to(bench / "bench" / "images")
    for record, message in cases:
        (folder / "bench.jsonl").write_text(json.dumps(good | {"id": "ok"}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(EvalError, match=rf"bench\.jsonl:2: {message}"):
            load_bench(folder)
    (folder / "bench.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(EvalError, match=r"bench\.jsonl:2: id '0' already used on line 1"):
        load_bench(folder)
    with pytest.raises(EvalError, match="benchmark folder not found"):
        load_bench(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------------
# the command


def test_eval_command_end_to_end(bench: Path, clip_checkpoint: Path, dino_folder: Path, tmp_path: Path,
                                 monkeypatch) -> None:
    with chat_server(JUDGE_ANSWER) as server:
        configure(monkeypatch, mllm_backend="openai", mllm_base_url=server.base_url, clip_model=TINY_CLIP_NAME,
                  clip_checkpoint=clip_checkpoint)
        result = invoke("--bench", str(bench / "bench"), "--method", f"perfect={bench / 'perfect'}",
                        "--method", f"lazy={bench / 'lazy'}", "--dino-checkpoint", str(dino_folder),
                        "--resolution", "32", "--json", "--markdown", str(tmp_path / "table.md"),
                        "--details", str(tmp_path / "details.jsonl"))
        assert result.exit_code == 0, result.stderr
        assert len(server.requests) == 5  # one judgement per output
    report = json.loads(result.stdout)
    perfect, lazy = report["methods"]["perfect"], report["methods"]["lazy"]
    assert perfect["missing"] == [] and lazy["missing"] == ["2"] and lazy["n_evaluated"] == 2
    assert perfect["metrics"]["l1"] == 0 and perfect["metrics"]["l2"] == 0
    assert perfect["metrics"]["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["metrics"]["dino_i"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["metrics"]["ic"] == pytest.approx(0.8) and perfect["metrics"]["bc"] == pytest.approx(0.8)
    assert lazy["counts"] == {"clip_i": 2, "dino_i": 2, "l1": 2, "l2": 2, "bg_l1": 0, "bg_l2": 0, "bg_dino_i": 0,
                              "ic": 2, "bc": 2}
    assert report["reference"] == "target" and report["references"]["l1"] == "target image"
    assert lazy["metrics"]["l1"] > 0.1 and lazy["metrics"]["clip_i"] < 1 - 1e-4 and lazy["metrics"]["dino_i"] < 1
    items = load_bench(bench / "bench")
    expected_l1 = np.mean([l1_distance(to_unit_array(Image.open(item.source), 32),
                                       to_unit_array(Image.open(item.target), 32)) for item in items[:2]])
    assert lazy["metrics"]["l1"] == pytest.approx(expected_l1)
    assert report["models"]["judge"] == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert report["notes"] == ["BG-L1/BG-L2/BG-DINO-I not measured (no item has edit regions leaving some background)"]
    table = (tmp_path / "table.md").read_text()
    assert ("| method | evaluated | missing | CLIP-I ↑ (target) | DINO-I ↑ (target) | L1 ↓ (target) | "
            "L2 ↓ (target) | BG-L1 ↓ (source bg) | BG-L2 ↓ (source bg) | BG-DINO-I ↑ (source bg) | IC ↑ (judge) | "
            "BC ↑ (judge) |") in table
    assert "| perfect | 3/3 | 0 | 1.0000 | 1.0000 | 0.0000 | 0.0000 | - | - | - | 0.8000 | 0.8000 |" in table
    assert "lazy: 1 missing output(s): 2" in table
    rows = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["method"] for r in rows} == {"perfect", "lazy"}

    with chat_server("no idea") as server:
        configure(monkeypatch, mllm_base_url=server.base_url)
        result = invoke("--bench", str(bench / "bench"), "--method", f"lazy={bench / 'lazy'}", "--resolution", "32")
    assert result.exit_code == 0, result.stderr
    assert "| lazy | 2/3 | 1 |" in result.stdout and "| - | - |" in result.stdout
    assert "2 judge failure(s)" in result.stdout and "DINO-I and BG-DINO-I not measured" in result.stdout


def test_eval_runs_models_on_the_fly(bench: Path, tmp_path: Path, monkeypatch) -> None:
    files: TinyFiles = make_tiny_files(tmp_path / "tiny")
    model = load_tiny_model(files, tiny_config(clip_vision_checkpoint=str(files.vision)))
    randomize_trained(model)
    from mcie.model.weights import save_weights

    weights = save_weights(model, tmp_path / "weights")
    configure(monkeypatch, editing_base_model_path=files.base, editing_weights_path=weights)
    outputs = tmp_path / "outputs"
    args = ["--bench", str(bench / "bench"), "--model", "mcie-e1", "--model", "ip2p", "--outputs", str(outputs),
            "--steps", "2", "--edit-resolution", "32", "--resolution", "32", "--no-judge", "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["methods"]) == {"mcie-e1", "ip2p"}
    for name in ("mcie-e1", "ip2p"):
        assert sorted(p.name for p in (outputs / name).iterdir()) == ["0.png", "1.png", "2.png"]
        assert report["methods"][name]["counts"]["l1"] == 3 and report["methods"][name]["metrics"]["ic"] is None
    assert not np.array_equal(np.asarray(Image.open(outputs / "mcie-e1" / "0.png")),
                              np.asarray(Image.open(outputs / "ip2p" / "0.png")))
    assert "IC/BC not measured" in " ".join(report["notes"])

    result = invoke("--bench", str(bench / "bench"), "--model", "mcie-e1", "--method", f"mcie-e1={bench}")
    assert result.exit_code == 2 and "'mcie-e1' is both a --method and a --model" in result.stderr
    result = invoke("--bench", str(bench / "bench"), "--judge", "--method", f"lazy={bench / 'lazy'}")
    assert result.exit_code == 2 and "the IC/BC judge needs an MLLM" in result.stderr
    result = invoke("--bench", str(bench / "bench"), "--method", "lazy")
    assert result.exit_code == 2 and "expected NAME=FOLDER" in result.stderr
    result = invoke("--bench", str(bench / "bench"), "--method", f"x={tmp_path / 'none'}", "--no-judge")
    assert result.exit_code == 2 and "method x: output folder" in result.stderr


def test_reference_free_bench_scores_against_the_source_and_its_background(
    clip_checkpoint: Path, dino_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CIE-Bench as the paper describes it: sources, instructions and regions, no targets."""
    root = tmp_path / "cie"
    (root / "images").mkdir(parents=True)
    sources = tiny_images(2, seed=21)
    lines = []
    for i, image in enumerate(sources):
        image.save(root / "images" / f"{i}.png")
        line = {"id": f"s{i}", "source": f"images/{i}.png", "instruction": "paint the left half red"}
        if i == 0:
            line["sub_instructions"] = [{"text": "paint the left half red", "box": [0.0, 0.0, 0.5, 1.0]}]
        else:
            line["regions"] = [[0.0, 0.0, 0.5, 1.0]]
        lines.append(line)
    (root / "bench.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    def edited(name: str, box: tuple[int, int, int, int] | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for i, image in enumerate(sources):
            out = image.copy()
            if box is not None:
                out.paste((255, 0, 0), box)
            out.save(folder / f"s{i}.png")
        return folder

    size = sources[0].size[0]
    configure(monkeypatch, clip_model=TINY_CLIP_NAME, clip_checkpoint=clip_checkpoint)
    result = invoke("--bench", str(root), "--method", f"copy={edited('copy', None)}",
                    "--method", f"inside={edited('inside', (0, 0, size // 2, size))}",
                    "--method", f"outside={edited('outside', (size // 2, 0, size, size))}",
                    "--dino-checkpoint", str(dino_folder), "--resolution", str(size), "--no-judge",
                    "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["reference"] == "source" and report["references"]["clip_i"] == "source image"
    assert report["references"]["bg_l1"] == "source image, outside the union of the boxes"
    copy, inside, outside = (report["methods"][k]["metrics"] for k in ("copy", "inside", "outside"))
    assert copy["l1"] == 0 and copy["bg_l1"] == 0 and copy["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert copy["bg_dino_i"] == pytest.approx(1.0, abs=1e-6)
    # an edit inside the regions changes the image but not its background
    assert inside["l1"] > 0.05 and inside["bg_l1"] == 0 and inside["bg_l2"] == 0
    assert inside["bg_dino_i"] > 0.9999  # not exactly 1: DINO's bicubic resize blurs the box edge by a pixel
    # the same edit outside the regions shows up in every background metric
    assert outside["bg_l1"] > 0.05 and outside["bg_dino_i"] < inside["bg_dino_i"] - 1e-3
    assert report["methods"]["outside"]["counts"]["bg_l1"] == 2

    result = invoke("--bench", str(root), "--method", f"copy={tmp_path / 'copy'}", "--resolution", str(size),
                    "--no-judge")
    assert result.exit_code == 0, result.stderr
    assert "reference-free, against the source images" in result.stdout and "L1 ↓ (source)" in result.stdout

    lines[1]["target"] = "images/0.png"  # a target on some items only: the bench must choose
    (root / "bench.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = invoke("--bench", str(root), "--method", f"copy={tmp_path / 'copy'}", "--no-judge")
    assert result.exit_code == 2
    assert "item 's0': target: no ground-truth image" in result.stderr.replace("\n", " ")
    result = invoke("--bench", str(root), "--method", f"copy={tmp_path / 'copy'}", "--no-judge",
                    "--reference", "source", "--json", "--resolution", str(size))
    assert result.exit_code == 0 and json.loads(result.stdout)["methods"]["copy"]["metrics"]["l1"] == 0


def test_background_mask() -> None:
    from mcie.model.evaluate import background_mask

    mask = background_mask([(0.0, 0.0, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0)], 4)
    assert mask.tolist() == [[False, False, True, True], [False, False, True, True],
                             [False, False, False, False], [False, False, False, False]]
    assert not background_mask([None], 4).any() and background_mask([], 4).all()
