"""mcie train: config errors, condition dropout, a tiny model overfitting 4 samples, and exact resume across stages.

Exports are written by hand here (JSONL: ``train.jsonl`` + ``images/``; WebDataset: tar shards) in the layout of
``docs/exports.md``, so no database is needed.
"""

from __future__ import annotations

import io
import json
import tarfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mcie.model.train import StageData, condition_dropout, find_checkpoint, sub_instruction_lists, train
from mcie.model.train_config import ConditioningDropout, DataConfig, TrainConfig, TrainConfigError, load_train_config
from tests.cli import invoke
from tests.model.tiny import TINY_IMAGE, TinyFiles, build_tiny_components, make_tiny_files, tiny_images

# diffusers' Euler schedulers call np.array(tensor, copy=False) internally (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
REPO = Path(__file__).resolve().parents[2]
TINY_TOML = REPO / "configs" / "train_tiny.toml"


# --------------------------------------------------------------------------------------------------------------
# fixtures: exports and bases


def _record(i: int) -> dict[str, Any]:
    subs = [{"text": f"add a red ball number {i}", "operation": "add", "box": [0.1, 0.1, 0.5, 0.6]},
            {"text": "make the sky purple", "operation": "change", "box": None},
            {"text": "remove the chair", "operation": "remove", "box": [0.5, 0.4, 0.9, 0.95]}]
    return {"sample_id": i, "instruction": f"edit the picture in way {i}", "sub_instructions": subs[: i % 4]}


def write_jsonl_export(folder: Path, n: int = 4, seed: int = 3) -> Path:
    images = tiny_images(2 * n, seed=seed)
    (folder / "images").mkdir(parents=True)
    with (folder / "train.jsonl").open("w") as handle:
        for i in range(n):
            images[i].save(folder / "images" / f"s{i}.png")
            images[n + i].save(folder / "images" / f"t{i}.png")
            record = {**_record(i), "source_image": {"path": f"images/s{i}.png"},
                      "target_image": {"path": f"images/t{i}.png"}}
            handle.write(json.dumps(record) + "\n")
    return folder


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, n: int = 4, per_shard: int = 2, seed: int = 4) -> Path:
    images = tiny_images(2 * n, seed=seed)
    folder.mkdir(parents=True)
    for shard in range(0, n, per_shard):
        with tarfile.open(folder / f"train-{shard // per_shard:06d}.tar", "w") as tar:
            for i in range(shard, min(n, shard + per_shard)):
                key = f"{i:010d}"
                record = {**_record(i), "source_image": {"path": f"{key}.source.png"},
                          "target_image": {"path": f"{key}.target.png"}}
                members = {f"{key}.json": json.dumps(record).encode(), f"{key}.source.png": _png(images[i]),
                           f"{key}.target.png": _png(images[n + i])}
                for name, data in sorted(members.items()):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    return make_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"jsonl": write_jsonl_export(root / "jsonl"), "wds": write_shards(root / "wds")}


@pytest.fixture(scope="module")
def wide_base(files: TinyFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with a wider UNet (32/64 channels, 8-wide heads): LoRA on a frozen random UNet of the standard
    tiny width cannot take the loss much below 0.7 of its start, this one can halve it."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    components = build_tiny_components(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components["unet"] = UNet2DConditionModel(
            sample_size=TINY_IMAGE // 2, in_channels=8, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8,
        )
    folder = tmp_path_factory.mktemp("wide") / "ip2p"
    StableDiffusionInstructPix2PixPipeline(**components, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False).save_pretrained(folder)
    return folder


def tiny_config_data(base: Path, vision: Path, jsonl: Path, out: Path) -> dict[str, Any]:
    """configs/train_tiny.toml with this test's paths."""
    data = tomllib.loads(TINY_TOML.read_text())
    data.update(base_model=str(base), vision_checkpoint=str(vision), output_dir=str(out))
    for stage in data["stages"]:
        stage["data"]["path"] = str(jsonl)
    return data


def resume_config_data(files: TinyFiles, data: dict[str, Path], out: Path) -> dict[str, Any]:
    """Two short stages (JSONL with accumulation, then WebDataset) with heavy condition dropout."""
    config = tiny_config_data(files.base, files.vision, data["jsonl"], out)
    config.update(checkpoint_every=2, keep_checkpoints=10, log_every=1,
                  conditioning_dropout={"text": 0.2, "image": 0.2, "both": 0.2})
    config["model"].update(lora_rank=2, lora_alpha=2.0)
    config["stages"] = [
        {"name": "general", "steps": 3, "batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 3e-3,
         "warmup_steps": 1, "data": {"path": str(data["jsonl"]), "resolution": 32, "num_workers": 0}},
        {"name": "mcie", "steps": 3, "batch_size": 1, "learning_rate": 2e-3, "lr_scheduler": "cosine",
         "data": {"format": "webdataset", "path": str(data["wds"]), "resolution": 32, "shuffle_buffer": 4,
                  "num_workers": 0}},
    ]
    return config


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """A config file (YAML: PyYAML comes with accelerate; the TOML reader is covered by the shipped configs)."""
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "mcie_e1.safetensors"))


# --------------------------------------------------------------------------------------------------------------
# config


def test_shipped_configs_are_valid() -> None:
    sd15 = load_train_config(REPO / "configs" / "train_sd15.toml")
    assert [(s.name, s.steps) for s in sd15.stages] == [("omniedit-got", 20000), ("mcie", 10000)]
    assert sd15.model.saca_layers == 2 and sd15.model.saca_queries == 2
    assert sd15.model.bcca_layers == 4 and sd15.model.bcca_queries == 16
    assert sd15.conditioning_dropout == ConditioningDropout(text=0.05, image=0.05, both=0.05)
    assert sd15.mixed_precision == "fp16" and sd15.gradient_checkpointing
    tiny = load_train_config(TINY_TOML, output_dir="elsewhere")
    assert tiny.output_dir == "elsewhere" and tiny.total_steps == 150


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["stages"][1]["data"].pop("path"), r"stages\[1\]\.data\.path: required key is missing"),
        (lambda d: d.update(learning_rate=1), r"learning_rate: unknown key"),
        (lambda d: d["model"].update(lora_rank=0), r"model\.lora_rank: Input should be greater than or equal to 1"),
        (lambda d: d.update(conditioning_dropout={"text": 0.5, "image": 0.5, "both": 0.1}),
         r"conditioning_dropout: text \+ image \+ both must be at most 1"),
        (lambda d: d["stages"][1].update(name="general"), r"stages: .*'general' is used twice"),
        (lambda d: d["stages"][0].update(warmup_steps=1000), r"stages\[0\]: warmup_steps \(1000\) exceeds steps"),
        (lambda d: d.update(stages=[]), r"stages: List should have at least 1 item"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path: Path, change: Any, message: str) -> None:
    data = tomllib.loads(TINY_TOML.read_text())
    change(data)
    path = write_config(tmp_path / "bad.yaml", data)
    with pytest.raises(TrainConfigError, match=rf"^{path}: .*{message}"):
        load_train_config(path)


def test_config_file_formats(tmp_path: Path) -> None:
    import yaml

    data = tomllib.loads(TINY_TOML.read_text())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert load_train_config(tmp_path / "c.yaml") == load_train_config(TINY_TOML)
    (tmp_path / "broken.toml").write_text("steps = [1,\n")
    with pytest.raises(TrainConfigError, match=r"broken\.toml: not valid TOML"):
        load_train_config(tmp_path / "broken.toml")
    with pytest.raises(TrainConfigError, match=r"missing\.toml: training config not found"):
        load_train_config(tmp_path / "missing.toml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(TrainConfigError, match=r"c\.ini: expected a \.toml"):
        load_train_config(tmp_path / "c.ini")
    result = invoke("train", "--config", str(tmp_path / "broken.toml"))
    assert result.exit_code == 2 and "broken.toml: not valid TOML" in result.stderr


# --------------------------------------------------------------------------------------------------------------
# pure parts


def test_condition_dropout_follows_instruct_pix2pix() -> None:
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    text, image = condition_dropout(n, ConditioningDropout(), generator)
    for name, share in (("text only", (text & ~image)), ("image only", (image & ~text)), ("both", text & image)):
        assert abs(share.float().mean().item() - 0.05) < 0.003, name
    assert abs((~text & ~image).float().mean().item() - 0.85) < 0.004
    none = condition_dropout(1000, ConditioningDropout(text=0, image=0, both=0), generator)
    assert not none[0].any() and not none[1].any()
    only_image = condition_dropout(1000, ConditioningDropout(text=0, image=1, both=0), generator)
    assert not only_image[0].any() and only_image[1].all()


def test_batches_become_per_sample_sub_instructions(data: dict[str, Path]) -> None:
    from mcie.model.data import JsonlEditDataset, collate_edit_batch

    dataset = JsonlEditDataset(data["jsonl"], resolution=TINY_IMAGE)
    batch = collate_edit_batch([dataset[i] for i in range(4)])
    texts, boxes = sub_instruction_lists(batch)
    assert texts == [[], ["add a red ball number 1"], ["add a red ball number 2", "make the sky purple"],
                     ["add a red ball number 3", "make the sky purple", "remove the chair"]]
    assert boxes is not None and boxes[3][1] is None
    assert boxes[3][0] == pytest.approx((0.1, 0.1, 0.5, 0.6)) and boxes[3][2] == pytest.approx((0.5, 0.4, 0.9, 0.95))
    assert sub_instruction_lists(collate_edit_batch([dataset[0]])) == (None, None)


def test_stage_data_order_is_seeded_sharded_and_resumable(data: dict[str, Path]) -> None:
    config = DataConfig(path=str(data["jsonl"]), resolution=TINY_IMAGE, num_workers=0)
    stream = StageData(config, 2, seed=1, stage_index=0)
    ids = [(b["sample_id"].tolist(), e, k) for b, e, k in _take(stream.stream(), 5)]
    assert sorted(i for batch, _, _ in ids[:2] for i in batch) == [0, 1, 2, 3]  # an epoch is a permutation
    assert [(e, k) for _, e, k in ids] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1)]
    assert [b for b, _, _ in ids[:2]] != [b for b, _, _ in ids[2:4]]  # each epoch its own order
    again = StageData(config, 2, seed=1, stage_index=0)
    assert [(b["sample_id"].tolist(), e, k) for b, e, k in _take(again.stream(1, 1), 2)] == ids[3:]
    halves = [StageData(config, 1, seed=1, stage_index=0, rank=r, world=2).epoch_indices(0) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == [0, 1, 2, 3] and len(halves[0]) == 2
    shards = StageData(DataConfig(format="webdataset", path=str(data["wds"]), resolution=TINY_IMAGE,
                                  shuffle_buffer=4, num_workers=0), 2, seed=1, stage_index=1)
    first = [(b["sample_id"].tolist(), e, k) for b, e, k in _take(shards.stream(), 3)]
    assert sorted(i for batch, _, _ in first[:2] for i in batch) == [0, 1, 2, 3]
    assert [(b["sample_id"].tolist(), e, k) for b, e, k in _take(shards.stream(0, 1), 2)] == first[1:]


def _take(iterator: Iterator[Any], n: int) -> list[Any]:
    return [next(iterator) for _ in range(n)]


# --------------------------------------------------------------------------------------------------------------
# training


def test_tiny_model_overfits_a_handful_of_samples(files: TinyFiles, data: dict[str, Path], wide_base: Path,
                                                  tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mcie.model.network import MCIEModel

    out = tmp_path / "run"
    config = TrainConfig.from_data(tiny_config_data(wide_base, files.vision, data["jsonl"], out))
    result = train(config, progress=False)
    assert result.finished and result.global_step == 150
    losses = [result.losses[step] for step in range(1, 151)]
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    assert last < 0.5 * first, (first, last)
    trained = MCIEModel.from_pretrained(wide_base, weights=out, vision_checkpoint=files.vision)
    saved = weights_of(out)
    assert saved.keys() == set(trained.trained_parameter_names())
    assert (out / "stage-general" / "mcie_e1.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000100", "step-00000150"]
    events = EventAccumulator(str(out / "logs" / "mcie-train")).Reload()
    assert {"train/loss", "train/lr", "train/steps_per_s", "train/samples_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")][-1] == 150


def test_resume_continues_exactly(files: TinyFiles, data: dict[str, Path], tmp_path: Path) -> None:
    straight = train(TrainConfig.from_data(resume_config_data(files, data, tmp_path / "a")), progress=False)
    assert straight.finished and sorted(straight.losses) == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "b"
    path = write_config(tmp_path / "b.yaml", resume_config_data(files, data, out))
    first = train(load_train_config(path), stop_after=3, progress=False)  # the end of stage 1
    assert not first.finished and first.losses == {k: straight.losses[k] for k in (1, 2, 3)}
    assert find_checkpoint(out) == out / "checkpoints" / "step-00000003"

    refused = invoke("train", "--config", str(path), "--no-progress")
    assert refused.exit_code == 2 and "already holds a training run: pass --resume" in refused.stderr

    second = invoke("train", "--config", str(path), "--resume", "--stop-after", "5", "--json")
    assert second.exit_code == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["resumed_from"].endswith("step-00000003") and summary["global_step"] == 5
    assert summary["last_loss"] == straight.losses[5] and not summary["finished"]

    changed = resume_config_data(files, data, out)
    changed["stages"][1]["learning_rate"] = 1e-3
    with pytest.raises(Exception, match=r"key stages\[1\]\.learning_rate differs from the run being resumed"):
        train(TrainConfig.from_data(changed), resume=True, progress=False)

    third = train(load_train_config(path), resume=True, progress=False)
    assert third.finished and third.losses == {6: straight.losses[6]}
    for stage in ("stage-general", "stage-mcie", "."):
        a, b = weights_of(tmp_path / "a" / stage), weights_of(out / stage)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    assert not all(torch.equal(v, weights_of(tmp_path / "a" / "stage-general")[k]) for k, v in weights_of(out).items())


def test_bf16_and_gradient_checkpointing_run_on_cpu(files: TinyFiles, data: dict[str, Path], tmp_path: Path) -> None:
    config = resume_config_data(files, data, tmp_path / "run")
    config.update(mixed_precision="bf16", gradient_checkpointing=True, tensorboard=False)
    config["stages"] = [{**config["stages"][0], "steps": 2, "gradient_accumulation_steps": 1}]
    result = train(TrainConfig.from_data(config), progress=False)
    assert result.finished and all(np.isfinite(v) for v in result.losses.values())
    trained = weights_of(tmp_path / "run")
    assert all(v.dtype == torch.float32 for v in trained.values())
    lora_b = [v for k, v in trained.items() if ".lora_B." in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # gradients reached the LoRA (zero at init)


def test_missing_inputs_are_named(files: TinyFiles, data: dict[str, Path], tmp_path: Path) -> None:
    config = resume_config_data(files, data, tmp_path / "run")
    config["stages"][1]["data"]["path"] = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match=r"stages\[1\]\.data\.path: .*nowhere: no such folder or file"):
        train(TrainConfig.from_data(config), progress=False, source="x.toml")
    config = resume_config_data(files, data, tmp_path / "run")
    del config["base_model"]
    with pytest.raises(Exception, match=r"x\.toml: base_model is not set and neither is MCIE_EDITING_BASE_MODEL_PATH"):
        train(TrainConfig.from_data(config), progress=False, source="x.toml")
