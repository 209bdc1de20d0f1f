"""The MCIE-E1 network: InstructPix2Pix's UNet, VAE and CLIP text encoder, plus SACA, BCCA and LoRA (paper 3.2, 4.2).

:class:`MCIEModel` loads a diffusers-layout InstructPix2Pix folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), given as a local folder or a Hugging Face Hub id resolved by :mod:`mcie.hub` (only
those folders are fetched, safetensors without the fp16 copies), and, when given an :class:`~model.config.MCIEConfig`:

- installs the MCIE attention processors on the UNet (:mod:`model.attention`);
- adds a peft LoRA adapter (``"default"``) to the self-attention layers only: ``attn1.to_q``, ``to_k``, ``to_v``,
  ``to_out.0`` (a regex on the module names, so ``attn2`` and everything else stay untouched);
- builds SACA (:class:`model.saca.SpatialContext`) and BCCA (:class:`model.bcca.BackgroundContext` over a frozen
  open_clip vision tower loaded from a checkpoint file);
- freezes everything except the LoRA, SACA, BCCA and the processors' projections (:meth:`trainable_parameters`).

Without a config (and without weights) it is plain InstructPix2Pix, the paper's baseline.

Conventions a training loop needs (those of diffusers' ``train_instruct_pix2pix.py``): the source image's latent is
``vae.encode(x).latent_dist.mode()`` *unscaled* (:meth:`encode_source_latents`), the target's is a sample times
``scaling_factor`` (:meth:`encode_target_latents`); the UNet sees ``cat([noisy_latents, source_latents], dim=1)``.
Conditioning dropout (InstructPix2Pix drops text and image 5 % each, both 5 %) is ``forward(..., drop_text=,
drop_image=)``: text dropped -> the empty prompt and no sub-instructions (every SACA slot invalid, so no boxes
either); image dropped -> zero source latents and BCCA tokens of an all-zero image. Classifier-free guidance at
inference (:mod:`model.pipeline`) uses exactly these "dropped" inputs for its unconditional branches.
A sub-instruction with no box gets the whole image. The base text is the whole complex instruction
(``base_text = "instruction"``) or the empty prompt (``"null"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mcie.model.attention import MCIEAttentionInputs, install_processors
from mcie.model.bcca import BackgroundContext, OpenClipPatchEncoder
from mcie.model.config import MCIEConfig
from mcie.model.masks import FULL_BOX, boxes_tensor, mask_strength
from mcie.model.saca import SpatialContext

__all__ = ["BASE_SUBFOLDERS", "LORA_TARGET_MODULES", "MCIEModel", "SubInstructionBatch"]

BASE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_TARGET_MODULES = r".*\.attn1\.(to_q|to_k|to_v|to_out\.0)"
_ADAPTER = "default"


@dataclass(frozen=True)
class SubInstructionBatch:
    """Encoded sub-instructions of a batch: contexts ``C_i`` ``(B, m, L, D)``, ``valid (B, m)``, ``boxes (B, m, 4)``."""

    context: torch.Tensor
    valid: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.context.shape[0])

    @property
    def slots(self) -> int:
        return int(self.context.shape[1])

    def dropped(self, drop: torch.Tensor | None = None) -> SubInstructionBatch:
        """The same batch with every slot of the samples in ``drop`` (all when ``None``) marked invalid."""
        if drop is None:
            return replace(self, valid=torch.zeros_like(self.valid))
        keep = ~drop.to(self.valid.device).bool().view(-1, 1)
        return replace(self, valid=self.valid & keep)

    def padded(self, slots: int) -> SubInstructionBatch:
        extra = slots - self.slots
        if extra <= 0:
            return self
        batch, _, length, dim = self.context.shape
        context = torch.cat([self.context, self.context.new_zeros(batch, extra, length, dim)], dim=1)
        valid = torch.cat([self.valid, self.valid.new_zeros(batch, extra)], dim=1)
        boxes = torch.cat([self.boxes, self.boxes.new_tensor(FULL_BOX).repeat(batch, extra, 1)], dim=1)
        return SubInstructionBatch(context, valid, boxes)

    @staticmethod
    def cat(batches: Sequence[SubInstructionBatch]) -> SubInstructionBatch:
        slots = max(b.slots for b in batches)
        padded = [b.padded(slots) for b in batches]
        return SubInstructionBatch(*(torch.cat([getattr(b, f) for b in padded]) for f in ("context", "valid", "boxes")))


def _require_folder(base: Path) -> None:
    if not base.is_dir():
        raise FileNotFoundError(f"InstructPix2Pix base folder not found: {base}")
    for sub in BASE_SUBFOLDERS:
        if not (base / sub).is_dir():
            raise FileNotFoundError(f"{base}: missing the {sub}/ folder of a diffusers InstructPix2Pix layout")


class MCIEModel(nn.Module):
    """InstructPix2Pix (+ SACA, BCCA, LoRA when ``config`` is given); see the module docstring."""

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        config: MCIEConfig | None = None,
        vision: OpenClipPatchEncoder | None = None,
    ) -> None:
        super().__init__()
        latent_channels = int(vae.config.latent_channels)
        if int(unet.config.in_channels) != 2 * latent_channels:
            raise ValueError(
                f"unet: in_channels is {unet.config.in_channels}, an InstructPix2Pix UNet takes "
                f"{2 * latent_channels} (noisy latent + source latent)"
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.config = config
        self.saca: SpatialContext | None = None
        self.bcca: BackgroundContext | None = None
        self.vision = vision
        if config is not None:
            self._build_mcie(config)
        self.freeze_base()

    # --- construction -----------------------------------------------------------------------------------------

    def _build_mcie(self, config: MCIEConfig) -> None:
        dim = int(self.unet.config.cross_attention_dim)
        if int(self.text_encoder.config.hidden_size) != dim:
            raise ValueError(
                f"text_encoder: hidden size {self.text_encoder.config.hidden_size} differs from the UNet's "
                f"cross_attention_dim {dim}"
            )
        if config.use_saca:
            self.saca = SpatialContext(
                dim, config.saca_queries, config.saca_layers, config.saca_width, config.saca_heads,
                config.fourier_freqs, config.ff_mult,
            )
        if config.use_bcca:
            if self.vision is None:
                raise ValueError("use_bcca: BCCA needs the open_clip vision tower (vision=)")
            self.bcca = BackgroundContext(
                self.vision.width, dim, config.bcca_queries, config.bcca_layers, config.bcca_width, config.bcca_heads,
                config.ff_mult,
            )
        install_processors(self.unet, config)
        from peft import LoraConfig

        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=LORA_TARGET_MODULES, init_lora_weights=True,
        )
        self.unet.add_adapter(lora, adapter_name=_ADAPTER)

    @classmethod
    def from_pretrained(
        cls,
        base_folder: str | Path,
        config: MCIEConfig | None = None,
        weights: str | Path | None = None,
        vision_checkpoint: str | Path | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> MCIEModel:
        """Load InstructPix2Pix from ``base_folder`` (a folder or a Hub id ``owner/name[@revision]``); add MCIE-E1
        when ``config`` or ``weights`` (a folder or Hub id written by :func:`model.weights.save_weights`, whose
        config is used) is given. BCCA's tower comes from
        ``vision_checkpoint`` or ``config.clip_vision_checkpoint``."""
        from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from mcie.hub import DIFFUSERS_IGNORE, DIFFUSERS_PATTERNS, resolve_folder
        from mcie.model.weights import load_weights, read_config

        base = resolve_folder(base_folder, "MCIE_EDITING_BASE_MODEL_PATH", allow=DIFFUSERS_PATTERNS,
                              ignore=DIFFUSERS_IGNORE)
        _require_folder(base)
        if weights is not None:
            config = _merge_configs(read_config(weights), config, weights)
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        vae = AutoencoderKL.from_pretrained(base / "vae")
        text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        scheduler_config = dict(EulerAncestralDiscreteScheduler.load_config(base / "scheduler"))
        vision = None
        if config is not None and config.use_bcca:
            checkpoint = vision_checkpoint or config.clip_vision_checkpoint
            if checkpoint is None:
                raise ValueError(
                    "BCCA needs an open_clip vision checkpoint: pass vision_checkpoint= or set clip_vision_checkpoint"
                )
            vision = OpenClipPatchEncoder.from_checkpoint(
                config.clip_vision_model, checkpoint, config.clip_vision_model_config, config.clip_vision_layer
            )
        model = cls(unet, vae, text_encoder, tokenizer, scheduler_config, config, vision)
        if weights is not None:
            load_weights(model, weights)
        return model.to(device=device, dtype=torch_dtype)

    def freeze_base(self) -> None:
        """Freeze everything, then unfreeze the LoRA, SACA, BCCA and processor parameters."""
        self.requires_grad_(False)
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(True)

    # --- properties -------------------------------------------------------------------------------------------

    @property
    def is_baseline(self) -> bool:
        """True for plain InstructPix2Pix (no SACA, BCCA, LoRA)."""
        return self.config is None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def trained_parameter_names(self) -> list[str]:
        """Names (relative to this model) of the trained parameters: LoRA, SACA, BCCA, processor projections."""
        if self.config is None:
            return []
        names = []
        for name, _ in self.named_parameters():
            if name.startswith(("saca.", "bcca.")) or ".processor." in name or ".lora_" in name:
                names.append(name)
        return names

    def trainable_parameters(self) -> list[nn.Parameter]:
        wanted = set(self.trained_parameter_names())
        return [p for name, p in self.named_parameters() if name in wanted]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        wanted = set(self.trained_parameter_names())
        return {name: p.detach() for name, p in self.named_parameters() if name in wanted}

    def noise_scheduler(self) -> Any:
        """A ``DDPMScheduler`` from the base folder's scheduler config, for adding noise in training."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    # --- encoders ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states ``(B, 77, D)``, tokenised and encoded as InstructPix2Pix's pipeline does."""
        if isinstance(texts, str):
            raise TypeError("encode_text: expected a sequence of strings, got one str")
        tokens = self.tokenizer(
            list(texts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(dtype=self.text_encoder.dtype)

    def encode_base_text(self, instructions: Sequence[str], drop: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's ordinary text tokens: the instruction (``""`` under ``base_text="null"`` or if dropped)."""
        texts = list(instructions)
        if self.config is not None and self.config.base_text == "null":
            texts = [""] * len(texts)
        if drop is not None:
            texts = [("" if bool(d) else t) for t, d in zip(texts, drop.tolist(), strict=True)]
        return self.encode_text(texts)

    def encode_sub_instructions(
        self,
        texts: Sequence[Sequence[str]],
        boxes: Sequence[Sequence[Any]] | None = None,
        drop: torch.Tensor | None = None,
    ) -> SubInstructionBatch:
        """Eq. 3-6: each sub-instruction encoded on its own by CLIP, plus the spatial tokens of its box."""
        if self.saca is None:
            raise ValueError("encode_sub_instructions: this model has no SACA (plain InstructPix2Pix or use_saca off)")
        assert self.config is not None
        boxes = [[None] * len(t) for t in texts] if boxes is None else boxes
        if len(boxes) != len(texts):
            raise ValueError(f"boxes: {len(boxes)} samples but texts has {len(texts)}")
        for b, (sample_texts, sample_boxes) in enumerate(zip(texts, boxes, strict=True)):
            if isinstance(sample_texts, str):
                raise TypeError(f"texts[{b}]: expected a list of sub-instructions, got one str")
            if len(sample_texts) != len(sample_boxes):
                raise ValueError(f"sample {b}: {len(sample_texts)} sub-instructions but {len(sample_boxes)} boxes")
        slots = max((len(t) for t in texts), default=0)
        if slots > self.config.max_sub_instructions:
            raise ValueError(f"{slots} sub-instructions exceed max_sub_instructions={self.config.max_sub_instructions}")
        box_tensor, valid = boxes_tensor(boxes, slots)
        flat = [text for sample in texts for text in sample]
        length, dim = self.tokenizer.model_max_length, int(self.unet.config.cross_attention_dim)
        text_tokens = torch.zeros(len(texts), slots, length, dim, device=self.device, dtype=self.text_encoder.dtype)
        if flat:
            text_tokens[valid.to(self.device)] = self.encode_text(flat)
        box_tensor, valid = box_tensor.to(self.device), valid.to(self.device)
        batch = SubInstructionBatch(self.saca(text_tokens, box_tensor), valid, box_tensor)
        return batch.dropped(drop) if drop is not None else batch

    @torch.no_grad()
    def vision_features(self, source_pixels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Frozen open_clip patch tokens of the source images (VAE convention, [-1, 1]); cacheable for training."""
        if self.vision is None:
            raise ValueError("vision_features: this model has no BCCA vision tower")
        return self.vision(source_pixels.to(self.device), drop)

    def encode_background(
        self, source_pixels: torch.Tensor | None = None, drop: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 9: BCCA tokens ``(B, bcca_queries, D)`` from pixels, or from precomputed :meth:`vision_features`;
        samples in ``drop`` get the tokens of the empty image."""
        if self.bcca is None:
            raise ValueError("encode_background: this model has no BCCA (plain InstructPix2Pix or use_bcca off)")
        if features is None:
            if source_pixels is None:
                raise ValueError("encode_background: give source_pixels or features")
            features = self.vision_features(source_pixels, drop)
        elif drop is not None and bool(drop.any()):
            assert self.vision is not None
            empty = torch.zeros(1, 3, *self.vision.image_size, device=self.device)
            null = self.vision_features(empty, torch.ones(1, dtype=torch.bool)).to(features.dtype)
            features = torch.where(drop.to(features.device).bool().view(-1, 1, 1), null, features.to(self.device))
        return self.bcca(features)

    @torch.no_grad()
    def guidance_background(self, source_pixels: torch.Tensor) -> torch.Tensor:
        """BCCA tokens of the three guidance branches ``[text + image, image, neither]``: ``(3B, Q, D)``, the
        source's tokens twice and the empty image's once. The frozen tower runs on the B sources and one empty image
        (B + 1 images instead of 3B); the tokens equal :meth:`encode_background` on the tripled batch."""
        features = self.vision_features(source_pixels)
        assert self.vision is not None
        empty = torch.zeros(1, 3, *self.vision.image_size, device=self.device)
        null = self.vision_features(empty, torch.ones(1, dtype=torch.bool)).to(features.dtype)
        batch = features.shape[0]
        return self.encode_background(features=torch.cat([features, features, null.expand(batch, -1, -1)]))

    @torch.no_grad()
    def encode_source_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """InstructPix2Pix's image conditioning: the VAE posterior's mode, not scaled."""
        return self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()

    @torch.no_grad()
    def encode_target_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.sample(generator)
        return latents * self.vae.config.scaling_factor

    # --- denoiser ---------------------------------------------------------------------------------------------

    def attention_inputs(
        self,
        timesteps: torch.Tensor,
        latent_hw: tuple[int, int],
        batch: int,
        sub_instructions: SubInstructionBatch | None = None,
        background: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
    ) -> MCIEAttentionInputs | None:
        """The processors' inputs for one UNet call, or ``None`` when there is nothing to add (plain IP2P)."""
        if sub_instructions is None and background is None:
            return None
        if self.config is None:
            raise ValueError("sub-instructions / background given to a plain InstructPix2Pix model (no MCIE config)")
        timesteps = torch.as_tensor(timesteps, device=self.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        strength = mask_strength(timesteps, self.num_train_timesteps, self.config.timestep_schedule)
        sub = sub_instructions
        return MCIEAttentionInputs(
            latent_hw=latent_hw,
            strength=strength,
            sub_context=None if sub is None else sub.context,
            sub_valid=None if sub is None else sub.valid,
            boxes=None if sub is None else sub.boxes,
            box_mask=box_mask,
            background=background,
            mask_mode=self.config.mask_mode,
            mask_resize=self.config.mask_resize,
            schedule_form=self.config.schedule_form,
            background_faded=self.config.background_schedule == "faded",
        )

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        source_latents: torch.Tensor,
        text: torch.Tensor | Sequence[str],
        sub_instructions: SubInstructionBatch | Sequence[Sequence[str]] | None = None,
        boxes: Sequence[Sequence[Any]] | None = None,
        box_mask: torch.Tensor | None = None,
        background: torch.Tensor | None = None,
        source_pixels: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 12's ``epsilon_theta(Cat(z_t, E(x)), B, c, t)``: the UNet's noise prediction ``(B, 4, h, w)``.

        ``text``: base text tokens ``(B, 77, D)`` or instruction strings (encoded by :meth:`encode_base_text`);
        ``sub_instructions``: a :class:`SubInstructionBatch` or per-sample lists of texts with ``boxes``;
        ``box_mask``: optional ``(B, m, H, W)`` pixel masks replacing the boxes' rectangles; ``background``: BCCA
        tokens from :meth:`encode_background`, or ``source_pixels`` / ``vision_features`` to compute them here (so
        that, under DDP, every trained module runs inside ``forward``). ``drop_text`` / ``drop_image`` (``(B,)``
        bool) apply InstructPix2Pix's condition dropout: the text becomes the empty prompt and the sample's
        sub-instructions are dropped; the source latent becomes zeros and BCCA sees the empty image (when BCCA is
        computed here). Without sub-instructions and background this is InstructPix2Pix.
        """
        text = self._base_text(text, drop_text)
        if sub_instructions is not None and not isinstance(sub_instructions, SubInstructionBatch):
            sub_instructions = self.encode_sub_instructions(sub_instructions, boxes)
        if sub_instructions is not None and drop_text is not None:
            sub_instructions = sub_instructions.dropped(drop_text)
        if background is None and (source_pixels is not None or vision_features is not None):
            background = self.encode_background(source_pixels, drop_image, vision_features)
        if drop_image is not None:
            keep = ~drop_image.to(source_latents.device).bool()
            source_latents = source_latents * keep.view(-1, 1, 1, 1).to(source_latents.dtype)
        batch = noisy_latents.shape[0]
        inputs = self.attention_inputs(
            timesteps, tuple(noisy_latents.shape[-2:]), batch, sub_instructions, background, box_mask
        )
        sample = torch.cat([noisy_latents, source_latents.to(noisy_latents.dtype)], dim=1)
        kwargs = None if inputs is None else {"mcie": inputs}
        return self.unet(
            sample, timesteps, encoder_hidden_states=text, cross_attention_kwargs=kwargs, return_dict=False
        )[0]

    def _base_text(self, text: torch.Tensor | Sequence[str], drop: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(text, torch.Tensor):
            return self.encode_base_text(text, drop)
        if drop is None or not bool(drop.any()):
            return text
        null = self.encode_text([""]).to(text.dtype)
        return torch.where(drop.to(text.device).bool().view(-1, 1, 1), null, text)


def _merge_configs(saved: MCIEConfig, given: MCIEConfig | None, weights: str | Path) -> MCIEConfig:
    """The saved config; a given one may only change load-time fields (the checkpoint path)."""
    if given is None:
        return saved
    loose = {"clip_vision_checkpoint"}
    a, b = saved.model_dump(), given.model_dump()
    differing = sorted(k for k in a if a[k] != b[k] and k not in loose)
    if differing:
        key = differing[0]
        raise ValueError(f"{weights}: config key {key!r} is {a[key]!r} in the weights but {b[key]!r} was given")
    return given

