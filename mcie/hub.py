"""Where model weights come from: a local path or a Hugging Face Hub id, resolved through ``huggingface_hub``.

Every weights setting (``MCIE_EDITING_BASE_MODEL_PATH``, ``MCIE_EDITING_WEIGHTS_PATH``,
``MCIE_EDITING_VISION_CHECKPOINT``, ``MCIE_CLIP_CHECKPOINT``, ``MCIE_DINO_CHECKPOINT``, ``MCIE_MLLM_MODEL_PATH``) and
the matching command-line options accept either form; this module is the one place that turns the value into a local
path, so every stage (the pipeline included) may import it without reaching into a later stage.

- An existing local path wins (a folder, or a file for open_clip checkpoints).
- ``owner/name`` or ``owner/name@revision`` (``hf-hub:owner/name`` too, open_clip's spelling) is a Hub repository at
  an optional branch, tag or commit. It is resolved in the Hugging Face cache (``HF_HUB_CACHE``, else
  ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and downloaded when missing, unless ``HF_HUB_OFFLINE=1`` (or
  ``TRANSFORMERS_OFFLINE=1``). Both variables are read at each call, not when ``huggingface_hub`` is imported.
- For open_clip, a pretrained tag of the architecture (``laion2b_s32b_b79k``, ``openai``) is turned into the Hub
  repository open_clip's own registry names for it.

A model that is neither on disk nor reachable raises :class:`ModelNotAvailable`, whose message names the id, the
revision, the setting, and the ``mcie models pull`` command that fetches it. The libraries (diffusers, transformers,
open_clip, vLLM) are then always given the resolved local folder or file, so they never reach the network themselves.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DIFFUSERS_IGNORE",
    "DIFFUSERS_PATTERNS",
    "OPEN_CLIP_FILES",
    "PRESETS",
    "HubRef",
    "ModelNotAvailable",
    "Preset",
    "hub_cache_dir",
    "is_offline",
    "parse_ref",
    "pull",
    "resolve_folder",
    "resolve_open_clip",
]

# the names open_clip / timm / laion repositories use for a checkpoint, safetensors first
OPEN_CLIP_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
# what MCIEModel reads of a diffusers InstructPix2Pix repository (the full-size .ckpt and fp16/flax/onnx copies of
# timbrooks/instruct-pix2pix are several GB that nothing here loads)
DIFFUSERS_PATTERNS = ("model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*")
DIFFUSERS_IGNORE = ("*.ckpt", "*.bin", "*fp16*", "*non_ema*", "*.msgpack", "*.onnx", "*.onnx_data")
_SKIP = ("*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*.ot", "*fp16*", "*.pb")
_REPO = re.compile(r"^(?:hf-hub:)?(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)/?(?:@(?P<rev>[\w./-]+))?$")


class ModelNotAvailable(FileNotFoundError):
    """The weights are neither on disk nor fetchable; the message says which and how to fetch them."""


@dataclass(frozen=True)
class HubRef:
    """A parsed weights value: a local ``path``, or a Hub ``repo_id`` at ``revision`` (None: the default branch)."""

    text: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        return self.text if self.path is not None else f"{self.repo_id}@{self.revision or 'main'}"


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as set now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (``HF_HUB_CACHE`` > ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def parse_ref(value: str | os.PathLike[str], setting: str = "weights") -> HubRef:
    """A local path when it exists, else a Hub id ``owner/name[@revision]``; anything else is a ``ValueError``."""
    text = os.fspath(value).strip()
    if not text:
        raise ValueError(f"{setting}: empty value (expected a local path or a Hugging Face Hub id owner/name)")
    path = Path(text).expanduser()
    if path.exists():
        return HubRef(text, path=path)
    match = _REPO.match(text)
    if match is None or text.startswith(("/", ".", "~")):
        raise ModelNotAvailable(
            f"{setting}: {text!r} is neither an existing local path nor a Hugging Face Hub id "
            "(owner/name, optionally @revision)"
        )
    return HubRef(text, repo_id=match["repo"], revision=match["rev"])


def _pull_hint(ref: HubRef) -> str:
    rev = f"@{ref.revision}" if ref.revision else ""
    return f"mcie models pull {ref.repo_id}{rev}"


def _not_available(ref: HubRef, setting: str, why: str) -> ModelNotAvailable:
    where = f"HF_HUB_OFFLINE=1, cache {hub_cache_dir()}" if is_offline() else f"cache {hub_cache_dir()}"
    return ModelNotAvailable(
        f"{setting}: model {ref.repo_id!r} (revision {ref.revision or 'main'}) is not available ({why}; {where}; "
        f"no local path {ref.text!r} exists either). "
        f"Fetch it on a machine with internet access with `{_pull_hint(ref)}` (HF_HOME must point at the same cache)"
    )


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # older huggingface_hub
        return (LocalEntryNotFoundError,)
    return (LocalEntryNotFoundError, IncompleteSnapshotError)


def _snapshot(
    ref: HubRef, setting: str, allow: Sequence[str] | None = None, ignore: Sequence[str] | None = None,
    progress: bool = False,
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    assert ref.repo_id is not None
    try:
        folder = snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=hub_cache_dir(), local_files_only=is_offline(),
            allow_patterns=list(allow) if allow else None, ignore_patterns=list(ignore) if ignore else None,
            tqdm_class=None if progress else _silent_tqdm(),
        )
    except _hub_errors() as exc:
        raise _not_available(ref, setting, "not in the local cache" if is_offline() else str(exc).splitlines()[0]) \
            from None
    except GatedRepoError:
        raise ModelNotAvailable(f"{setting}: {ref.repo_id!r} is gated: accept its licence on the Hub and log in "
                                "with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelNotAvailable(f"{setting}: no Hugging Face repository {ref.repo_id!r} (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelNotAvailable(f"{setting}: {ref.repo_id!r} has no revision {ref.revision!r}") from None
    return Path(folder)


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class _Silent(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


def resolve_folder(
    value: str | os.PathLike[str], setting: str, *, allow: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None, progress: bool = False,
) -> Path:
    """A local model folder for ``value`` (a folder, or a Hub id fetched into / found in the cache)."""
    ref = parse_ref(value, setting)
    if ref.path is not None:
        if not ref.path.is_dir():
            raise ModelNotAvailable(f"{setting}: {ref.path} is a file, expected a model folder")
        return ref.path
    return _snapshot(ref, setting, allow, ignore, progress)


def _pretrained_repo(model_name: str, tag: str) -> str | None:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    hub = str(cfg.get("hf_hub") or "").strip("/")
    return hub or None


def resolve_open_clip(
    model_name: str, value: str | os.PathLike[str], setting: str = "MCIE_CLIP_CHECKPOINT"
) -> Path:
    """A local open_clip checkpoint file for ``value``: a file, a folder holding one of :data:`OPEN_CLIP_FILES`, a
    Hub id (``[hf-hub:]owner/name[@rev]``), or a pretrained tag of ``model_name`` (e.g. ``laion2b_s32b_b79k``)."""
    text = os.fspath(value).strip()
    if "/" not in text and not Path(text).expanduser().exists():
        repo = _pretrained_repo(model_name, text)
        if repo is None:
            raise ModelNotAvailable(
                f"{setting}: {text!r} is not a file, a folder, a Hub id, or a pretrained tag of open_clip's "
                f"{model_name} (see open_clip.list_pretrained_tags_by_model({model_name!r}))"
            )
        text = repo
    ref = parse_ref(text, setting)
    if ref.path is None:
        return _open_clip_file(ref, setting)
    if ref.path.is_file():
        return ref.path
    for name in OPEN_CLIP_FILES:
        if (ref.path / name).is_file():
            return ref.path / name
    raise ModelNotAvailable(f"{setting}: folder {ref.path}: expected one of {', '.join(OPEN_CLIP_FILES)} in it")


def _open_clip_file(ref: HubRef, setting: str) -> Path:
    """The first of :data:`OPEN_CLIP_FILES` the repository has (one file fetched, not every copy of the weights;
    huggingface_hub shows its progress bar unless ``HF_HUB_DISABLE_PROGRESS_BARS`` is set)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    assert ref.repo_id is not None
    last = "not in the local cache"
    for name in OPEN_CLIP_FILES:
        try:
            return Path(hf_hub_download(ref.repo_id, name, revision=ref.revision, cache_dir=hub_cache_dir(),
                                        local_files_only=is_offline()))
        except EntryNotFoundError:
            continue
        except _hub_errors() as exc:
            if not is_offline():
                last = str(exc).splitlines()[0]
            continue
        except GatedRepoError:
            raise ModelNotAvailable(f"{setting}: {ref.repo_id!r} is gated: accept its licence on the Hub and log in "
                                    "with `hf auth login` (or set HF_TOKEN)") from None
        except RepositoryNotFoundError:
            raise ModelNotAvailable(f"{setting}: no Hugging Face repository {ref.repo_id!r} (or it is private)") \
                from None
    raise _not_available(ref, setting, f"{last}; looked for {', '.join(OPEN_CLIP_FILES)}")


# --------------------------------------------------------------------------------------------------------------
# mcie models pull


@dataclass(frozen=True)
class Preset:
    """A named model of the paper's set: its Hub repository, what to fetch of it, and the setting it serves."""

    repo_id: str
    kind: str  # "diffusers" | "open_clip" | "transformers"
    setting: str
    use: str


PRESETS: dict[str, Preset] = {
    "instruct-pix2pix": Preset("timbrooks/instruct-pix2pix", "diffusers", "MCIE_EDITING_BASE_MODEL_PATH",
                               "InstructPix2Pix (SD 1.5), MCIE-E1's base model"),
    "clip-vit-h-14": Preset("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip", "MCIE_EDITING_VISION_CHECKPOINT",
                            "BCCA's vision tower (open_clip ViT-H-14, laion2b_s32b_b79k)"),
    "clip-vit-l-14": Preset("timm/vit_large_patch14_clip_224.openai", "open_clip", "MCIE_CLIP_CHECKPOINT",
                            "Eq. 1 box selection and CLIP-I (open_clip ViT-L-14-quickgelu, openai)"),
    "dinov2-base": Preset("facebook/dinov2-base", "transformers", "MCIE_DINO_CHECKPOINT", "DINO-I of mcie eval"),
    "qwen2.5-vl-7b": Preset("Qwen/Qwen2.5-VL-7B-Instruct", "transformers", "MCIE_MLLM_MODEL_PATH",
                            "MLLM for one GPU (filter, grounding, decomposition, judge)"),
    "qwen2.5-vl-72b": Preset("Qwen/Qwen2.5-VL-72B-Instruct", "transformers", "MCIE_MLLM_MODEL_PATH",
                             "the paper's MLLM (about 150 GB)"),
}
PAPER_SET = ("instruct-pix2pix", "clip-vit-h-14", "clip-vit-l-14", "dinov2-base", "qwen2.5-vl-72b")


@dataclass(frozen=True)
class Pulled:
    name: str
    repo_id: str
    revision: str | None
    path: Path
    files: int
    bytes: int
    setting: str | None


def _patterns(kind: str) -> tuple[Sequence[str] | None, Sequence[str] | None]:
    if kind == "diffusers":
        return DIFFUSERS_PATTERNS, DIFFUSERS_IGNORE
    return None, _SKIP


def expand_names(names: Sequence[str]) -> list[str]:
    """Preset names and Hub ids, with ``paper`` standing for the paper's whole set."""
    out: list[str] = []
    for name in names:
        for item in PAPER_SET if name == "paper" else (name,):
            if item not in out:
                out.append(item)
    return out


def pull(name: str, progress: bool = True) -> Pulled:
    """Fetch a preset or any Hub id (``owner/name[@rev]``) into the cache; returns where it is and its size."""
    preset = PRESETS.get(name)
    text = preset.repo_id if preset else name
    ref = parse_ref(text, f"mcie models pull {name}")
    if ref.path is not None:
        raise ValueError(f"mcie models pull {name}: that is a local path; give a preset name or a Hub id owner/name")
    setting = f"mcie models pull {name}"
    if preset is not None and preset.kind == "open_clip":
        file = _open_clip_file(ref, setting)
        folder, files = file.parent, [file]
    else:
        allow, ignore = _patterns(preset.kind if preset else "")
        folder = _snapshot(ref, setting, allow, ignore, progress)
        files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return Pulled(name, ref.repo_id or text, ref.revision, folder, len(files), size, preset.setting if preset else None)


def cached_models() -> list[dict[str, object]]:
    """Every repository in the Hugging Face cache with its size, revisions and location."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        rows.append({"repo_id": repo.repo_id, "type": repo.repo_type, "bytes": repo.size_on_disk,
                     "files": repo.nb_files, "revisions": sorted(r.commit_hash[:12] for r in repo.revisions),
                     "path": str(repo.repo_path)})
    return rows
