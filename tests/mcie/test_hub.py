"""mcie.hub and `mcie models`: local paths or Hub ids, resolved offline in a real Hugging Face cache layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mcie.hub import ModelNotAvailable, parse_ref, resolve_folder, resolve_open_clip
from tests.hf_cache import add_to_cache


def _folder(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"text": text}))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "weights.bin").write_bytes(text.encode() * 10)
    return root


def test_parse_ref_tells_paths_from_hub_ids(tmp_path: Path) -> None:
    local = _folder(tmp_path / "owner" / "name", "local")
    assert parse_ref(local).path == local
    ref = parse_ref("timbrooks/instruct-pix2pix")
    assert (ref.repo_id, ref.revision, ref.path) == ("timbrooks/instruct-pix2pix", None, None)
    ref = parse_ref("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K@v1.0")
    assert (ref.repo_id, ref.revision) == ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "v1.0")
    with pytest.raises(ModelNotAvailable, match=r"MCIE_X: './missing/model' is neither an existing local path"):
        parse_ref("./missing/model", "MCIE_X")
    with pytest.raises(ModelNotAvailable, match="neither an existing local path nor a Hugging Face Hub id"):
        parse_ref("no spaces/in ids", "MCIE_X")


def test_resolve_folder_by_id_and_revision_from_the_cache(hf_home: Path, tmp_path: Path) -> None:
    main = add_to_cache(hf_home, "acme/model", _folder(tmp_path / "v1", "one"))
    tagged = add_to_cache(hf_home, "acme/model", _folder(tmp_path / "v2", "two"), ref="v2")
    assert main != tagged and (main / "sub" / "weights.bin").is_symlink()
    assert resolve_folder("acme/model", "MCIE_X") == main
    assert json.loads((resolve_folder("acme/model@v2", "MCIE_X") / "config.json").read_text()) == {"text": "two"}
    assert resolve_folder(f"acme/model@{tagged.name}", "MCIE_X") == tagged  # a pinned commit
    local = _folder(tmp_path / "plain", "local")
    assert resolve_folder(local, "MCIE_X") == local


def test_offline_missing_model_names_the_id_and_the_fetch_command(hf_home: Path) -> None:
    with pytest.raises(ModelNotAvailable) as caught:
        resolve_folder("timbrooks/instruct-pix2pix@abc", "MCIE_EDITING_BASE_MODEL_PATH")
    message = str(caught.value)
    assert "MCIE_EDITING_BASE_MODEL_PATH" in message and "'timbrooks/instruct-pix2pix' (revision abc)" in message
    assert "HF_HUB_OFFLINE=1" in message and "`mcie models pull timbrooks/instruct-pix2pix@abc`" in message
    assert str(hf_home / "hub") in message


def test_open_clip_checkpoint_by_file_folder_hub_id_and_pretrained_tag(hf_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"bin")
    assert resolve_open_clip("ViT-B-32", folder) == folder / "open_clip_pytorch_model.bin"
    assert resolve_open_clip("ViT-B-32", folder / "open_clip_pytorch_model.bin").name == "open_clip_pytorch_model.bin"
    snapshot = add_to_cache(hf_home, "timm/vit_base_patch32_clip_224.openai", folder)
    # open_clip's registry maps the tag "openai" of ViT-B-32 to that repository
    assert resolve_open_clip("ViT-B-32", "openai") == snapshot / "open_clip_pytorch_model.bin"
    assert resolve_open_clip("ViT-B-32", "hf-hub:timm/vit_base_patch32_clip_224.openai") == \
        snapshot / "open_clip_pytorch_model.bin"
    (folder / "open_clip_model.safetensors").write_bytes(b"st")
    newer = add_to_cache(hf_home, "acme/clip", folder)
    assert resolve_open_clip("ViT-B-32", "acme/clip") == newer / "open_clip_model.safetensors"  # safetensors first
    with pytest.raises(ModelNotAvailable, match="not a file, a folder, a Hub id, or a pretrained tag"):
        resolve_open_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(ModelNotAvailable, match="mcie models pull acme/absent"):
        resolve_open_clip("ViT-B-32", "acme/absent")


def test_settings_keep_paths_and_ids_as_text(tmp_path: Path) -> None:
    from mcie.config import load_settings

    settings = load_settings(clip_checkpoint=tmp_path / "x.pt", editing_base_model_path="timbrooks/instruct-pix2pix")
    assert settings.clip_checkpoint == str(tmp_path / "x.pt")
    assert settings.editing_base_model_path == "timbrooks/instruct-pix2pix"


def test_models_pull_and_list_offline(hf_home: Path, tmp_path: Path) -> None:
    from mcie.cli import app

    add_to_cache(hf_home, "facebook/dinov2-base", _folder(tmp_path / "dino", "dino"))
    runner = CliRunner()
    result = runner.invoke(app, ["models", "pull", "dinov2-base", "acme/absent", "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert [row["repo_id"] for row in summary["pulled"]] == ["facebook/dinov2-base"]
    assert summary["pulled"][0]["files"] == 2 and summary["pulled"][0]["setting"] == "MCIE_DINO_CHECKPOINT"
    assert summary["failed"] == ["acme/absent"]
    assert "mcie models pull acme/absent" in result.stderr.replace("\n", " ")

    clip = tmp_path / "vit-h"
    clip.mkdir()
    (clip / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (clip / "README.md").write_text("card")
    add_to_cache(hf_home, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", clip)
    result = runner.invoke(app, ["models", "pull", "clip-vit-h-14", "--json"])
    assert result.exit_code == 0, result.output
    [pulled] = json.loads(result.stdout)["pulled"]
    assert pulled["files"] == 1 and Path(pulled["path"]).parent.name == "snapshots"

    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [row["repo_id"] for row in listed["cached"]] == ["facebook/dinov2-base",
                                                            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
    assert {row["name"]: row["cached"] for row in listed["presets"]}["dinov2-base"] is True
    assert {row["name"] for row in listed["presets"] if row["paper"]} >= {"instruct-pix2pix", "clip-vit-h-14"}
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "facebook/dinov2-base" in result.stdout
