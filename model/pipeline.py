"""MCIE-E1 inference: a diffusers-style pipeline with Euler Ancestral and InstructPix2Pix's 3-way guidance.

``MCIEPipeline(image, instruction, sub_instructions=None, num_inference_steps=20, guidance_scale=7.5,
image_guidance_scale=1.5, generator=None | seed=None)`` follows ``StableDiffusionInstructPix2PixPipeline`` step
for step: text embeddings ``[instruction, "", ""]``, image latents ``[E(x), E(x), 0]`` (the VAE posterior's mode,
unscaled), ``latents = randn * init_noise_sigma``, and per step ``eps = eps_uncond + g_text * (eps_text -
eps_image) + g_image * (eps_image - eps_uncond)`` with ``scheduler.step(..., generator=)``. So with a plain
InstructPix2Pix model (no MCIE weights) it gives that pipeline's output for the same components and seed.

With MCIE-E1 the three branches are, consistently with training's condition dropout (:mod:`model.network`):
``[text + image]`` has the sub-instructions (SACA) and the source image's BCCA tokens; ``[image only]`` has no
sub-instructions and the source's BCCA tokens; ``[neither]`` has no sub-instructions and the BCCA tokens of an empty
image. Sub-instructions and BCCA tokens are encoded once per call, not per step.

Sub-instructions per image are ``(text, box)``, ``(text, operation, box)``, dicts with ``text``/``instruction`` and
``box``, or objects with ``instruction``/``text`` and ``box`` attributes (e.g. :class:`mcie.mllm.decompose.SubEdit`);
a box is normalised ``(x0, y0, x1, y1)`` or ``None`` (whole image). Without them, a model with SACA calls
``decompose(image, instruction)`` (the MLLM step, passed in) for each image; with neither, it is an error (pass
``sub_instructions=[]`` to run without spatial guidance). Without an instruction, the base text is the
sub-instructions joined with ", ". A model without SACA (plain InstructPix2Pix, or the BCCA-only ablation) ignores
sub-instructions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from mcie.model.masks import box_tuple
from mcie.model.network import MCIEModel, SubInstructionBatch

__all__ = ["Decompose", "MCIEPipeline", "MCIEPipelineOutput", "SubInstruction", "parse_sub_instruction"]

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
SubInstruction = tuple[str, Box | None]
Decompose = Callable[[PIL.Image.Image, str], Sequence[Any]]


@dataclass
class MCIEPipelineOutput:
    """``images``: PIL images, an ``np.ndarray`` ``(B, H, W, 3)``, a tensor, or latents (per ``output_type``);
    ``sub_instructions``: the (text, box) pairs used for each image."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    sub_instructions: list[list[SubInstruction]]


def parse_sub_instruction(item: Any, where: str = "sub-instruction") -> SubInstruction:
    """One sub-instruction in any accepted form (see the module docstring) as ``(text, box | None)``."""
    if isinstance(item, Mapping):
        text, box = item.get("text", item.get("instruction")), item.get("box")
    elif isinstance(item, tuple | list):
        if len(item) not in (2, 3):
            raise ValueError(f"{where}: expected (text, box) or (text, operation, box), got {len(item)} items")
        text, box = item[0], item[-1]
    else:
        text = getattr(item, "instruction", getattr(item, "text", None))
        box = getattr(item, "box", None)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: expected a non-empty text, got {text!r}")
    return text, None if box is None else box_tuple(box, where)


def _is_single_list(sub_instructions: Sequence[Any]) -> bool:
    """True for one image's list of items rather than a list of per-image lists."""
    first = sub_instructions[0]
    return not (isinstance(first, list) or (isinstance(first, tuple) and first and isinstance(first[0], tuple)))


class MCIEPipeline:
    """Text + image -> edited image with MCIE-E1 (or plain InstructPix2Pix); see the module docstring."""

    def __init__(self, model: MCIEModel, scheduler: Any | None = None, decompose: Decompose | None = None) -> None:
        from diffusers import EulerAncestralDiscreteScheduler
        from diffusers.image_processor import VaeImageProcessor

        self.model = model
        self.scheduler = scheduler or EulerAncestralDiscreteScheduler.from_config(model.scheduler_config)
        self.decompose = decompose
        self.vae_scale_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(
        cls,
        base_folder: str | Path,
        weights: str | Path | None = None,
        vision_checkpoint: str | Path | None = None,
        decompose: Decompose | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> MCIEPipeline:
        """InstructPix2Pix from ``base_folder``, with MCIE-E1 ``weights`` (a :func:`model.weights.save_weights`
        folder) when given, else the plain baseline."""
        model = MCIEModel.from_pretrained(
            base_folder, weights=weights, vision_checkpoint=vision_checkpoint, torch_dtype=torch_dtype, device=device
        )
        return cls(model.eval(), decompose=decompose)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MCIEPipeline:
        self.model.to(device=device, dtype=dtype)
        return self

    # --- inputs -----------------------------------------------------------------------------------------------

    @staticmethod
    def _images(image: Any) -> list[Any]:
        if isinstance(image, PIL.Image.Image):
            return [image]
        if isinstance(image, torch.Tensor | np.ndarray) and image.ndim == 4:
            return list(image)
        if isinstance(image, torch.Tensor | np.ndarray):
            return [image]
        if isinstance(image, Sequence) and image:
            return list(image)
        raise ValueError(f"image: expected a PIL image, an array/tensor or a list, got {type(image).__name__}")

    @staticmethod
    def _instructions(instruction: str | Sequence[str] | None, batch: int) -> list[str | None]:
        if instruction is None or isinstance(instruction, str):
            return [instruction] * batch
        if len(instruction) != batch:
            raise ValueError(f"instruction: {len(instruction)} instructions for {batch} images")
        return list(instruction)

    def _sub_lists(self, sub_instructions: Sequence[Any] | None, batch: int) -> list[list[SubInstruction]] | None:
        if sub_instructions is None:
            return None
        if len(sub_instructions) == 0:
            return [[] for _ in range(batch)]
        per_image = [sub_instructions] if batch == 1 and _is_single_list(sub_instructions) else sub_instructions
        if len(per_image) != batch:
            raise ValueError(f"sub_instructions: {len(per_image)} lists for {batch} images")
        return [
            [parse_sub_instruction(item, f"sub_instructions[{b}][{i}]") for i, item in enumerate(items)]
            for b, items in enumerate(per_image)
        ]

    def _decomposed(self, images: list[Any], instructions: list[str | None]) -> list[list[SubInstruction]]:
        if self.decompose is None:
            raise ValueError(
                "MCIE-E1 needs sub-instructions with boxes: pass sub_instructions=, a decompose callable, "
                "or sub_instructions=[] for no spatial guidance"
            )
        out = []
        for b, (image, instruction) in enumerate(zip(images, instructions, strict=True)):
            if not isinstance(image, PIL.Image.Image) or instruction is None:
                raise ValueError(f"image {b}: decompose needs a PIL image and an instruction")
            items = self.decompose(image, instruction)
            out.append([parse_sub_instruction(item, f"decompose(image {b})[{i}]") for i, item in enumerate(items)])
        return out

    def resolve(
        self, images: list[Any], instructions: list[str | None], sub_instructions: Sequence[Any] | None
    ) -> tuple[list[str], list[list[SubInstruction]]]:
        """The base instruction and the (text, box) sub-instructions of every image."""
        uses_saca = self.model.saca is not None
        subs = self._sub_lists(sub_instructions, len(images))
        if subs is None:
            subs = self._decomposed(images, instructions) if uses_saca else [[] for _ in images]
        texts = []
        for b, (instruction, items) in enumerate(zip(instructions, subs, strict=True)):
            if instruction is None and not items:
                raise ValueError(f"image {b}: give an instruction or sub-instructions")
            texts.append(instruction if instruction is not None else ", ".join(text for text, _ in items))
        if not uses_saca and any(subs):
            log.info("this model has no SACA: sub-instructions are not used")
        return texts, subs

    # --- denoising --------------------------------------------------------------------------------------------

    def _conditioning(
        self, pixels: torch.Tensor, texts: list[str], subs: list[list[SubInstruction]], guided: bool
    ) -> tuple[torch.Tensor, SubInstructionBatch | None, torch.Tensor | None]:
        model, batch = self.model, len(texts)
        text = model.encode_base_text(texts)
        if guided:
            empty = model.encode_text([""] * batch)
            text = torch.cat([text, empty, empty])
        sub = None
        if model.saca is not None and any(subs):
            sub = model.encode_sub_instructions([[t for t, _ in s] for s in subs], [[b for _, b in s] for s in subs])
            sub = SubInstructionBatch.cat([sub, sub.dropped(), sub.dropped()]) if guided else sub
        background = None
        if model.bcca is not None:  # guided: the source's tokens in the first two branches, the empty image's last
            background = model.guidance_background(pixels) if guided else model.encode_background(pixels)
        return text, sub, background

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        instruction: str | Sequence[str] | None = None,
        sub_instructions: Sequence[Any] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = False,
    ) -> MCIEPipelineOutput:
        """Edit ``image`` (one or a batch); see the module docstring for the inputs."""
        from diffusers import EulerAncestralDiscreteScheduler
        from diffusers.utils.torch_utils import randn_tensor

        model = self.model
        device, dtype = model.device, model.text_encoder.dtype
        images = self._images(image)
        texts, subs = self.resolve(images, self._instructions(instruction, len(images)), sub_instructions)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        guided = guidance_scale > 1.0 and image_guidance_scale >= 1.0

        pixels = self.image_processor.preprocess(images).to(device=device, dtype=dtype)
        text, sub, background = self._conditioning(pixels, texts, subs, guided)
        scheduler = EulerAncestralDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)

        image_latents = model.encode_source_latents(pixels).to(dtype)
        if guided:
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        shape = (len(images), model.vae.config.latent_channels, *pixels.shape[-2:])
        shape = (*shape[:2], shape[2] // self.vae_scale_factor, shape[3] // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device) * scheduler.init_noise_sigma

        steps = scheduler.timesteps
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="mcie edit")
        for t in steps:
            model_input = torch.cat([latents] * 3) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = model(model_input, t, image_latents, text, sub, background=background)
            if guided:
                noise_text, noise_image, noise_uncond = noise.chunk(3)
                noise = (
                    noise_uncond
                    + guidance_scale * (noise_text - noise_image)
                    + image_guidance_scale * (noise_image - noise_uncond)
                )
            latents = scheduler.step(noise, t, latents, generator=generator, return_dict=False)[0]

        if output_type == "latent":
            return MCIEPipelineOutput(latents, subs)
        decoded = model.vae.decode(latents / model.vae.config.scaling_factor, return_dict=False)[0]
        out = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[True] * len(images))
        return MCIEPipelineOutput(out, subs)
