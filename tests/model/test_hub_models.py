"""Every model weights setting loads by Hugging Face Hub id, offline, from a real HF cache layout in a temporary
HF_HOME: the editing base, the MCIE-E1 weights (pinned by @revision), BCCA's tower, CLIP-I / Eq. 1 CLIP, DINOv2,
and the transformers MLLM backend. Each result is compared with the same model loaded by local path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mcie.hub import ModelNotAvailable
from tests.hf_cache import add_to_cache
from tests.model.tiny import load_tiny_model, make_tiny_files, randomize_trained, tiny_config, tiny_images
from tests.tiny_clip import TINY_CLIP_NAME, register_tiny_clip


def test_editing_model_by_hub_ids_matches_local_paths(hf_home: Path, tmp_path: Path) -> None:
    from mcie.model.network import MCIEModel
    from mcie.model.weights import save_weights

    files = make_tiny_files(tmp_path / "files")
    model = load_tiny_model(files, tiny_config())
    randomize_trained(model, seed=5)
    save_weights(model, tmp_path / "weights")
    add_to_cache(hf_home, "acme/tiny-ip2p", files.base)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_model.safetensors").write_bytes(files.vision.read_bytes())
    add_to_cache(hf_home, "acme/tiny-clip", tmp_path / "clip")
    add_to_cache(hf_home, "acme/tiny-mcie", tmp_path / "weights", ref="v1")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        by_id = MCIEModel.from_pretrained("acme/tiny-ip2p", weights="acme/tiny-mcie@v1",
                                          vision_checkpoint="hf-hub:acme/tiny-clip").eval()
    by_path = MCIEModel.from_pretrained(files.base, weights=tmp_path / "weights", vision_checkpoint=files.vision).eval()
    for name, tensor in by_path.state_dict().items():
        assert torch.equal(tensor, by_id.state_dict()[name]), name
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(by_id.vision_features(image), by_path.vision_features(image))

    with pytest.raises(ModelNotAvailable, match=r"`mcie models pull acme/tiny-mcie@v2`"):
        MCIEModel.from_pretrained("acme/tiny-ip2p", weights="acme/tiny-mcie@v2", vision_checkpoint=files.vision)


def test_eval_encoders_and_box_scorer_by_hub_id(hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Dinov2Config, Dinov2Model

    from mcie.config import load_settings
    from mcie.model.evaluate import ClipImageEncoder, DinoImageEncoder
    from mcie.pipeline.scoring import ClipScorer, make_scorer
    from tests.tiny_clip import save_tiny_clip

    register_tiny_clip()
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    save_tiny_clip(clip_dir / "open_clip_model.safetensors", seed=2)
    add_to_cache(hf_home, "acme/tiny-openclip", clip_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 patch_size=8, image_size=32)).save_pretrained(tmp_path / "dino")
    add_to_cache(hf_home, "acme/tiny-dinov2", tmp_path / "dino")

    images = tiny_images(2, seed=3)
    clip = ClipImageEncoder(TINY_CLIP_NAME, "acme/tiny-openclip", "cpu")
    assert clip.name == f"{TINY_CLIP_NAME} (acme/tiny-openclip)"
    local_clip = ClipImageEncoder(TINY_CLIP_NAME, clip_dir / "open_clip_model.safetensors", "cpu")
    assert torch.equal(clip.embed(images), local_clip.embed(images))
    dino = DinoImageEncoder("acme/tiny-dinov2", "cpu", crop=32)
    assert dino.name == "acme/tiny-dinov2"
    assert torch.equal(dino.embed(images), DinoImageEncoder(tmp_path / "dino", "cpu", crop=32).embed(images))

    settings = load_settings(clip_model=TINY_CLIP_NAME, clip_checkpoint="acme/tiny-openclip", device="cpu")
    scorer = make_scorer("auto", settings)
    assert isinstance(scorer, ClipScorer)
    from mcie.config import ConfigError

    with pytest.raises(ConfigError, match="mcie models pull acme/absent"):
        make_scorer("clip", load_settings(clip_model=TINY_CLIP_NAME, clip_checkpoint="acme/absent", device="cpu"))


def test_transformers_mllm_backend_by_hub_id(hf_home: Path, tmp_path: Path) -> None:
    from mcie.config import ConfigError, load_settings
    from mcie.mllm.base import MLLMRequest, make_backend, user
    from tests.mcie.mllm.tiny_qwen import build_tiny_qwen25_vl

    folder = build_tiny_qwen25_vl(tmp_path / "tiny-qwen")
    add_to_cache(hf_home, "acme/tiny-qwen25-vl", folder)
    backend = make_backend(settings=load_settings(mllm_backend="transformers", mllm_model_path="acme/tiny-qwen25-vl",
                                                  device="cpu"))
    assert backend.model == "acme/tiny-qwen25-vl"
    assert backend.path.parent.name == "snapshots"  # type: ignore[attr-defined]
    [response] = backend.generate([MLLMRequest((user("Say hi."),), max_tokens=2)])
    assert response.ok, response.error
    backend.close()
    with pytest.raises(ConfigError, match="mcie models pull acme/other"):
        make_backend(settings=load_settings(mllm_backend="transformers", mllm_model_path="acme/other", device="cpu"))
