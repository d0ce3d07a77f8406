"""UniRefEditPipeline: multi-reference image editing, any number of references, batches packed.

One call edits a batch of samples, each with its own prompt and its own 1..N reference images of any
sizes. The references of a sample share one pixel budget (SELF, `uniref.plan_reference_sizes`), every
sample gets its own output size and its own flow-matching schedule, and all samples -- conditional and
unconditional branches of classifier-free guidance included -- run packed in ONE transformer forward per
step, without padding. Reference tokens are computed once; each step only the noisy target tokens change
(`uniref.sampling`: the batch, the schedule and the loop shared with MSGRPO).
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from uniref.models.transformer import UniRefTransformer2DModel
from uniref.packing import BUDGET_MODES, BudgetMode, fit_area, pack_latents, plan_reference_sizes, unpack_latents
from uniref.pipelines.text_encoders import PromptEncoder, QwenVLPromptEncoder
from uniref.sampling import SamplingBatch, denoise, make_schedule

__all__ = [
    "DEFAULT_MODEL_DIR",
    "DefaultModelUnavailableError",
    "PipelineLoadError",
    "UniRefEditPipeline",
    "UniRefEditPipelineOutput",
]

# Where the embedded default model (a pipeline folder with model_index.json) is shipped.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "default_model"

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class DefaultModelUnavailableError(FileNotFoundError):
    """`UniRefEditPipeline.from_pretrained()` was called without a folder, and no default model is shipped."""


class PipelineLoadError(ValueError):
    """A pipeline folder that cannot be loaded: missing, incomplete, corrupt or mismatched files."""


_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder")


def check_pipeline_folder(path: Path) -> None:
    """Checks a saved pipeline's layout before loading: every component present with its config, and
    safetensors weights (the only format loaded; pickled ``.bin`` files are never opened).

    Raises:
        PipelineLoadError: naming the folder, the component and what is missing.
    """
    index = path / "model_index.json"
    if not index.is_file():
        raise PipelineLoadError(
            f"{path} is not a saved UniRefEditPipeline (no model_index.json); save one with save_pretrained"
        )
    try:
        spec = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineLoadError(f"{index} is corrupt ({exc}); re-save the pipeline") from exc
    for name in _COMPONENTS:
        entry = spec.get(name) if isinstance(spec, dict) else None
        folder = path / name
        if not entry or entry == [None, None] or not folder.is_dir() or not any(folder.rglob("*.json")):
            raise PipelineLoadError(f"{path}: the {name} component is missing (no {name}/ folder with its config)")
        if name != "scheduler" and not any(folder.rglob("*.safetensors")):
            raise PipelineLoadError(
                f"{path}: {name}/ has no .safetensors weights (uniref loads safetensors only and never unpickles .bin)"
            )


@dataclass
class UniRefEditPipelineOutput(BaseOutput):
    """Output of `UniRefEditPipeline`.

    Args:
        images: one entry per sample, in order. Samples may have different sizes, so entries are never
            stacked: ``PIL.Image.Image`` (``"pil"``), ``np.ndarray`` ``(H, W, 3)`` float32 in [0, 1]
            (``"np"``), ``torch.Tensor`` ``(3, H, W)`` in [0, 1] (``"pt"``), or the normalized latent
            ``(C, H / vae_scale_factor, W / vae_scale_factor)`` (``"latent"``).
    """

    images: list


def _is_image(x) -> bool:
    return isinstance(x, (PIL.Image.Image, np.ndarray, Tensor))


def _as_reference(img, where: str) -> PIL.Image.Image | Tensor:
    """One reference as an RGB PIL image or a ``(3, H, W)`` float tensor in [0, 1]."""
    if isinstance(img, PIL.Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"{where}: an np.ndarray image must be (H, W, 3), got shape {img.shape}")
        if img.dtype == np.uint8:
            return PIL.Image.fromarray(img)
        if not np.issubdtype(img.dtype, np.floating):
            raise ValueError(f"{where}: an np.ndarray image must be uint8, or float in [0, 1]; got {img.dtype}")
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    if isinstance(img, Tensor):
        if img.ndim == 4 and img.shape[0] == 1:
            img = img[0]
        if img.ndim != 3 or img.shape[0] != 3 or not img.is_floating_point():
            raise ValueError(
                f"{where}: a tensor image must be float (3, H, W) or (1, 3, H, W) in [0, 1], "
                f"got {img.dtype} {tuple(img.shape)}"
            )
        if img.numel() and (img.min() < 0 or img.max() > 1):
            raise ValueError(
                f"{where}: tensor values must lie in [0, 1]; rescale with (x + 1) / 2 if they are in [-1, 1]"
            )
        return img
    raise ValueError(f"{where} is a {type(img).__name__}; expected a PIL.Image.Image, np.ndarray or torch.Tensor")


def _hw(img: PIL.Image.Image | Tensor) -> tuple[int, int]:
    return (img.height, img.width) if isinstance(img, PIL.Image.Image) else (int(img.shape[1]), int(img.shape[2]))


def _to_pil(img: PIL.Image.Image | Tensor) -> PIL.Image.Image:
    if isinstance(img, PIL.Image.Image):
        return img
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(img[None].float().cpu()))[0]


class UniRefEditPipeline(DiffusionPipeline):
    r"""Multi-reference image editing with a packed-varlen MMDiT (UniRef-Image-Edit).

    Components:
        transformer ([`UniRefTransformer2DModel`]): predicts the flow-matching velocity of the targets.
        vae ([`~diffusers.AutoencoderKL`] or [`~diffusers.AutoencoderKLQwenImage`]): encodes references and
            decodes outputs. Latents are normalized as ``(z - mean) * scaling_factor / std`` with ``mean`` =
            ``latents_mean`` or ``shift_factor`` or 0 and ``std`` = ``latents_std`` or 1 from the VAE config
            (Qwen-Image: mean/std; FLUX-style KL: shift/scale); a Qwen-Image/Wan VAE's frame axis is added
            and removed here.
        scheduler ([`~diffusers.FlowMatchEulerDiscreteScheduler`]): the sampler. With dynamic shifting (as
            Qwen-Image) each sample's shift ``mu`` follows its own target token count, so every sample
            steps on its own copy of the scheduler.
        text_encoder ([`PromptEncoder`]): [`ByteTextEncoder`] (small, text only) or [`QwenVLPromptEncoder`]
            (Qwen2.5-VL with the reference images, as Qwen-Image-Edit-Plus).
        target_pixels (`int`): default output area, the first reference's aspect ratio kept; 1024^2 for
            Qwen-Image-sized models, the native size of a small model.
        pixel_budget (`int`, optional): the default reference budget of a call (the budget the model was
            trained with); ``target_pixels`` when not set.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: UniRefTransformer2DModel,
        vae,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: PromptEncoder,
        target_pixels: int = 1024 * 1024,
        pixel_budget: int | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder)
        self.register_to_config(target_pixels=target_pixels, pixel_budget=pixel_budget)
        if pixel_budget is not None and (not isinstance(pixel_budget, int) or pixel_budget <= 0):
            raise ValueError(f"pixel_budget={pixel_budget!r} must be None or a positive int number of pixels")
        if transformer is None or vae is None or text_encoder is None:
            return  # a pipeline loaded without some component (from_pretrained(..., vae=None)): nothing to pair
        multiple = self.vae_scale_factor * self.patch_size
        if not isinstance(target_pixels, int) or target_pixels < multiple * multiple:
            raise ValueError(
                f"target_pixels={target_pixels!r} must be an int >= {multiple * multiple} ({multiple}x{multiple})"
            )
        tokens_in = self.latent_channels * self.patch_size**2
        if transformer.config.in_channels != tokens_in:
            raise ValueError(
                f"the VAE has {self.latent_channels} latent channels, so image tokens have {tokens_in} features, "
                f"but transformer.config.in_channels={transformer.config.in_channels}; pair a transformer and a VAE "
                "made for each other"
            )
        if not isinstance(text_encoder, PromptEncoder):
            raise ValueError(
                f"text_encoder is a {type(text_encoder).__name__}, which lacks encode_prompts/embed_dim; wrap it "
                "(ByteTextEncoder, QwenVLPromptEncoder, or your own PromptEncoder)"
            )
        if text_encoder.embed_dim != transformer.config.joint_attention_dim:
            raise ValueError(
                f"text_encoder.embed_dim={text_encoder.embed_dim} must equal transformer.config.joint_attention_dim="
                f"{transformer.config.joint_attention_dim}"
            )

    # ----------------------------------------------------------------------------------------
    # Geometry of the components
    # ----------------------------------------------------------------------------------------

    @property
    def _video_vae(self) -> bool:
        # Qwen-Image / Wan VAEs are 3-D: images go in and out as one-frame videos (B, C, 1, H, W).
        return "temperal_downsample" in self.vae.config

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along a side."""
        if self._video_vae:
            return 2 ** len(self.vae.config.temperal_downsample)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        cfg = self.vae.config
        return cfg.z_dim if "z_dim" in cfg else cfg.latent_channels

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def default_pixel_budget(self) -> int:
        """The reference budget a call uses when given none: the config's ``pixel_budget`` (what the model
        was trained with) or ``target_pixels``."""
        return self.config.get("pixel_budget") or self.config.target_pixels

    @property
    def image_processor(self) -> VaeImageProcessor:
        # resizes to the exact planned size (a multiple of vae_scale_factor * patch_size), RGB, [-1, 1]
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * self.patch_size, do_convert_rgb=True)

    def _latent_stats(self, device, dtype) -> tuple[Tensor, Tensor, float]:
        cfg = self.vae.config
        c = self.latent_channels
        mean = cfg.get("latents_mean")
        mean = mean if mean is not None else [cfg.get("shift_factor") or 0.0] * c
        std = cfg.get("latents_std")
        std = std if std is not None else [1.0] * c
        scale = cfg.get("scaling_factor") or 1.0
        as_t = lambda v: torch.tensor(v, device=device, dtype=dtype).view(c, 1, 1)  # noqa: E731
        return as_t(mean), as_t(std), scale

    # ----------------------------------------------------------------------------------------
    # Steps of a call, each usable on its own
    # ----------------------------------------------------------------------------------------

    def check_inputs(self, images, prompt, negative_prompt) -> tuple[list[list], list[str], list[str]]:
        """Validates and normalizes ``images``/``prompt``/``negative_prompt`` to per-sample lists.

        Returns ``(samples, prompts, negative_prompts)``: ``samples[i]`` the references of sample i as RGB
        PIL images or ``(3, H, W)`` float tensors in [0, 1].
        """
        if isinstance(prompt, str):
            refs = [images] if _is_image(images) else images
            if not isinstance(refs, (list, tuple)) or not refs:
                raise ValueError(
                    "images must be a non-empty list of reference images (PIL, np.ndarray or torch.Tensor) for "
                    f"one prompt, got {type(images).__name__}"
                )
            if any(isinstance(r, (list, tuple)) for r in refs):
                raise ValueError(
                    "images is a list of lists (a batch) but prompt is a single str; pass one prompt per sample, "
                    "prompt=[...] with len(prompt) == len(images)"
                )
            groups, prompts = [list(refs)], [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            if not (
                isinstance(images, (list, tuple))
                and len(images) == len(prompt)
                and all(isinstance(s, (list, tuple)) for s in images)
            ):
                raise ValueError(
                    f"for a batch of {len(prompt)} prompts, images must be a list of {len(prompt)} lists of "
                    "references, images[i] for prompt[i]"
                )
            groups, prompts = [list(s) for s in images], list(prompt)
        else:
            raise ValueError(f"prompt must be a str (one sample) or a non-empty list of str (a batch), got {prompt!r}")
        samples = []
        for i, refs in enumerate(groups):
            if not refs:
                raise ValueError(f"images[{i}] is empty; every sample needs at least one reference image")
            samples.append([_as_reference(img, f"images[{i}][{k}]") for k, img in enumerate(refs)])

        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        elif (
            isinstance(negative_prompt, (list, tuple))
            and len(negative_prompt) == len(prompts)
            and all(isinstance(p, str) for p in negative_prompt)
        ):
            negatives = list(negative_prompt)
        else:
            raise ValueError(
                f"negative_prompt must be None, a str for every sample, or a list of {len(prompts)} str "
                f"(one per prompt), got {negative_prompt!r}"
            )
        return samples, prompts, negatives

    def plan_sizes(
        self,
        samples: Sequence[Sequence[PIL.Image.Image | Tensor]],
        pixel_budget: int,
        budget_mode: str,
        height: int | None,
        width: int | None,
    ) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
        """Per sample, ``((target_h, target_w), [(ref_h, ref_w), ...])`` in pixels, multiples of 16 (VAE x patch).

        References follow `uniref.plan_reference_sizes` (``pixel_budget``, ``budget_mode``); the target is
        ``(height, width)`` if given, else the first reference's aspect ratio at ``target_pixels``.
        """
        multiple = self.vae_scale_factor * self.patch_size
        plans = []
        for refs in samples:
            sizes = [_hw(img) for img in refs]
            planned = plan_reference_sizes(sizes, pixel_budget, multiple=multiple, mode=budget_mode)
            if height is None:
                target = fit_area(sizes[0], self.config.target_pixels, multiple)
            else:
                target = (height, width)
            plans.append((target, planned))
        return plans

    def encode_prompt(
        self, prompts: Sequence[str], images: Sequence[Sequence[PIL.Image.Image]], device, dtype
    ) -> tuple[Tensor, list[int]]:
        """Packed prompt embeddings ``((T_txt, D) on device/dtype, lengths)`` from the text encoder."""
        embeds, lengths = self.text_encoder.encode_prompts(list(prompts), [list(s) for s in images])
        return embeds.to(device=device, dtype=dtype), [int(n) for n in lengths]

    def encode_image(self, image: PIL.Image.Image | Tensor, size: tuple[int, int]) -> Tensor:
        """Resizes one reference to ``size`` (pixels) and returns its normalized latent ``(C, h, w)``.

        The latent is the mode of the VAE posterior (deterministic), as Qwen-Image-Edit-Plus encodes references.
        """
        return self.encode_images([image], size)[0]

    def encode_sized(
        self, images: Sequence[PIL.Image.Image | Tensor], sizes: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        """Normalized latents ``(C, h, w)`` of ``images[i]`` resized to ``sizes[i]``, in order, with one VAE call
        per distinct size (and image type): how references and training targets are encoded."""
        if len(images) != len(sizes):
            raise ValueError(f"{len(images)} images for {len(sizes)} sizes")
        groups: dict[tuple, list[int]] = {}
        for i, (img, size) in enumerate(zip(images, sizes)):
            groups.setdefault((tuple(size), isinstance(img, Tensor)), []).append(i)
        out: list = [None] * len(images)
        for (size, _), idx in groups.items():
            for i, z in zip(idx, self.encode_images([images[i] for i in idx], size).unbind(0)):
                out[i] = z
        return out

    def encode_images(self, images: Sequence[PIL.Image.Image | Tensor], size: tuple[int, int]) -> Tensor:
        """`encode_image` for several images resized to the same ``size``, in one VAE call: ``(N, C, h, w)``."""
        x = self.image_processor.preprocess(list(images), size[0], size[1]).to(self.vae.device, self.vae.dtype)
        if self._video_vae:
            x = x[:, :, None]
        z = self.vae.encode(x).latent_dist.mode()
        z = z[:, :, 0] if self._video_vae else z
        mean, std, scale = self._latent_stats(z.device, z.dtype)
        return (z - mean) * scale / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalized latent ``(C, h, w)`` (or a batch ``(N, C, h, w)``) -> images ``(1 or N, 3, h * f, w * f)``
        in [-1, 1] (VAE range)."""
        z = latents.to(self.vae.device, self.vae.dtype)
        mean, std, scale = self._latent_stats(z.device, z.dtype)
        z = z * std / scale + mean
        z = z[None] if z.ndim == 3 else z
        if self._video_vae:
            return self.vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0]
        return self.vae.decode(z, return_dict=False)[0]

    def prepare_latents(self, latent_sizes, generator, device, dtype) -> list[Tensor]:
        """Initial noise ``(C, h, w)`` per sample.

        ``generator`` is one `torch.Generator` (samples draw from it in order) or a list with one per
        sample (sample i draws only from ``generator[i]``, so a batch reproduces, sample for sample, calls
        made one sample at a time with the same generators). Noise is drawn as ``(1, C, h, w)``, the same
        numbers Qwen-Image-Edit-Plus draws for one sample.
        """
        if isinstance(generator, list) and len(generator) != len(latent_sizes):
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {len(latent_sizes)} samples; pass one per "
                "sample, or a single torch.Generator"
            )
        noise = []
        for i, (h, w) in enumerate(latent_sizes):
            g = generator[i] if isinstance(generator, list) else generator
            noise.append(randn_tensor((1, self.latent_channels, h, w), generator=g, device=device, dtype=dtype)[0])
        return noise

    # ----------------------------------------------------------------------------------------
    # The call
    # ----------------------------------------------------------------------------------------

    def _check_numbers(
        self, true_cfg_scale, num_inference_steps, pixel_budget, budget_mode, height, width, output_type
    ) -> None:
        multiple = self.vae_scale_factor * self.patch_size
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if (
            not isinstance(true_cfg_scale, numbers.Real)
            or isinstance(true_cfg_scale, bool)
            or not math.isfinite(true_cfg_scale)
            or true_cfg_scale < 1
        ):
            raise ValueError(f"true_cfg_scale must be a number >= 1 (1 disables guidance), got {true_cfg_scale!r}")
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}")
        if not isinstance(pixel_budget, int) or isinstance(pixel_budget, bool) or pixel_budget <= 0:
            raise ValueError(
                f"pixel_budget must be a positive int number of pixels (e.g. 1024 * 1024), got {pixel_budget!r}"
            )
        if (height is None) != (width is None):
            raise ValueError("pass both height and width, or neither (then the first reference's aspect ratio is used)")
        for name, v in (("height", height), ("width", width)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % multiple):
                hint = f" (e.g. {max(multiple, v // multiple * multiple)})" if isinstance(v, int) else ""
                raise ValueError(f"{name}={v!r} must be a positive multiple of {multiple}{hint}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    @torch.no_grad()
    def __call__(
        self,
        images,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float = 4.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        pixel_budget: int | None = None,
        budget_mode: BudgetMode = "global",
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> UniRefEditPipelineOutput | tuple:
        r"""Edits one sample or a packed batch of samples.

        Args:
            images: one sample: a list of 1..N references (``PIL.Image.Image``; ``np.ndarray`` ``(H, W, 3)``,
                uint8 or float in [0, 1]; ``torch.Tensor`` ``(3, H, W)`` float in [0, 1]) -- a bare image is a
                list of one. A batch: a list of such lists, one per prompt. Samples may differ in the number
                and sizes of references.
            prompt: the instruction (``str``) of one sample, or a list with one per sample.
            negative_prompt: the unconditional prompt(s) of classifier-free guidance: ``None`` (the empty
                prompt), one ``str`` for all samples, or one per sample. Unlike Qwen-Image-Edit-Plus, guidance
                does not silently switch off without a negative prompt.
            true_cfg_scale: guidance scale, >= 1; 1 disables guidance (one branch), above 1 the conditional
                and unconditional branches run packed in the same forward and the combination is rescaled
                to the conditional prediction's norm per token, as Qwen-Image-Edit-Plus.
            num_inference_steps: Euler steps (sigmas ``linspace(1, 1/n, n)`` shifted per sample); >= 2 with
                Qwen-Image's scheduler, whose ``shift_terminal`` has no valid one-step schedule.
            generator: a ``torch.Generator`` or one per sample, see `prepare_latents`.
            pixel_budget: reference pixels (SELF): the total of a sample's references in ``"global"`` mode,
                each reference's area in ``"per_image"`` mode (as Qwen-Image-Edit-Plus). Default:
                `default_pixel_budget`.
            budget_mode: ``"global"`` or ``"per_image"``, see `uniref.plan_reference_sizes`.
            height, width: output size in pixels for every sample, multiples of ``vae_scale_factor *
                patch_size`` (16); default: per sample, its first reference's aspect ratio at ``target_pixels``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``, see `UniRefEditPipelineOutput`.
            return_dict: return a `UniRefEditPipelineOutput` (else a tuple ``(images,)``).

        Returns:
            `UniRefEditPipelineOutput` with one image per sample.
        """
        if pixel_budget is None:
            pixel_budget = self.default_pixel_budget
        self._check_numbers(true_cfg_scale, num_inference_steps, pixel_budget, budget_mode, height, width, output_type)
        samples, prompts, negatives = self.check_inputs(images, prompt, negative_prompt)
        plans = self.plan_sizes(samples, pixel_budget, budget_mode, height, width)
        device = self._execution_device
        dtype = self.transformer.dtype
        f, p = self.vae_scale_factor, self.patch_size
        do_cfg = true_cfg_scale > 1

        # 1. Prompts (cond, then uncond: one packed text stream for the whole model batch)
        pil_refs = [[_to_pil(img) for img in refs] for refs in samples]
        embeds, text_lengths = self.encode_prompt(
            prompts + negatives if do_cfg else prompts, pil_refs * 2 if do_cfg else pil_refs, device, dtype
        )

        # 2. References -> latents, once (images planned to the same size share a VAE call)
        flat = self.encode_sized([img for refs in samples for img in refs], [hw for _, plan in plans for hw in plan])
        ref_latents, k = [], 0
        for refs in samples:
            ref_latents.append([z.to(device, dtype) for z in flat[k : k + len(refs)]])
            k += len(refs)

        # 3. Noise, the packed batch, per-sample schedules. The state holds every sample's target tokens
        #    (T_tgt, C p p); the model batch repeats the samples for the unconditional branch.
        latent_sizes = [(h // f, w // f) for (h, w), _ in plans]
        noise = self.prepare_latents(latent_sizes, generator, device, dtype)
        batch = SamplingBatch.build(
            latent_sizes, ref_latents, 2 if do_cfg else 1, p, self.latent_channels, device, dtype
        )
        state = pack_latents([[x] for x in noise], patch_size=p).tokens
        schedule = make_schedule(self.scheduler, batch.targets.target_lengths, num_inference_steps, device)

        def model_fn(hidden, t, layout):
            return self.transformer(hidden, embeds, t, layout, text_lengths)

        # 4. Denoise: one packed forward per step for all samples and both guidance branches
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            state = denoise(
                model_fn,
                batch,
                schedule,
                state,
                true_cfg_scale,
                callback=lambda k, x: progress_bar.update(),
                dtype=dtype,
            )

        # 5. Latents -> images, one sample at a time (sizes differ)
        latents = [sample[0] for sample in unpack_latents(state, batch.targets)]
        # NaN/inf would be clamped into a black image by postprocess: refuse it instead (FloatingPointError)
        if not all(bool(torch.isfinite(z).all()) for z in latents):
            raise FloatingPointError(
                "the sampled latents are not finite (NaN or inf): the model's weights are broken or the guidance "
                f"scale ({true_cfg_scale}) overflows"
            )
        if output_type == "latent":
            out = latents
        else:
            processor = self.image_processor
            decoded = [self.decode_latents(z) for z in latents]
            if not all(bool(torch.isfinite(x).all()) for x in decoded):
                raise FloatingPointError("the VAE decoded non-finite pixels (NaN or inf): its weights are broken")
            out = [processor.postprocess(x, output_type=output_type)[0] for x in decoded]
        self.maybe_free_model_hooks()
        return UniRefEditPipelineOutput(images=out) if return_dict else (out,)

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, **kwargs) -> "UniRefEditPipeline":
        """Loads a pipeline saved with `save_pretrained`, or the embedded default model without a folder.

        Reads local files only (pass ``local_files_only=False`` to allow a Hub download). Other kwargs
        (``torch_dtype``, ...) are diffusers'.

        Raises:
            DefaultModelUnavailableError: no folder was given and no default model is shipped.
        """
        if pretrained_model_name_or_path is None:
            if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
                raise DefaultModelUnavailableError(
                    "uniref's embedded default model is not shipped in this installation (expected at "
                    f"{DEFAULT_MODEL_DIR}); pass a local pipeline folder to from_pretrained(...), or build a "
                    "pipeline with UniRefEditPipeline.from_qwenimage_edit(...)"
                )
            pretrained_model_name_or_path = DEFAULT_MODEL_DIR
        kwargs.setdefault("local_files_only", True)
        kwargs["use_safetensors"] = True  # never fall back to unpickling .bin files
        # diffusers' low-memory loading needs accelerate; without it, load plainly instead of warning.
        kwargs.setdefault("low_cpu_mem_usage", importlib.util.find_spec("accelerate") is not None)
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            if kwargs["local_files_only"]:
                raise PipelineLoadError(f"{path} is not a folder; pass a saved pipeline folder (save_pretrained)")
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_pipeline_folder(path)
        from uniref.pipelines.loading import check_component_weights

        check_component_weights(path)
        try:
            return super().from_pretrained(path, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            if isinstance(exc, PipelineLoadError):
                raise
            detail = " ".join(str(exc).split())[:400]
            raise PipelineLoadError(
                f"{path}: cannot load the pipeline, a file is corrupt or its components do not fit together "
                f"({type(exc).__name__}: {detail})"
            ) from exc

    def load_lora(self, path, merge: bool = False) -> "UniRefEditPipeline":
        """Applies a LoRA file trained here or elsewhere (diffusers, PEFT or kohya/ComfyUI format) to the
        transformer, as an adapter or merged (`UniRefTransformer2DModel.load_lora`)."""
        self.transformer.load_lora(path, merge=merge)
        return self

    @classmethod
    def from_qwenimage_edit_folder(
        cls,
        folder: str | Path,
        target_pixels: int = 1024 * 1024,
        torch_dtype: torch.dtype | None = None,
        attention_backend: str = "auto",
        **components,
    ) -> "UniRefEditPipeline":
        """Loads a local diffusers ``QwenImageEditPlusPipeline`` folder: the transformer straight from its
        safetensors shards (`UniRefTransformer2DModel.from_qwenimage`: one copy of the weights, in
        ``torch_dtype`` or as stored), the other components through diffusers (safetensors only, no download;
        ``components`` replace any of them, as diffusers' ``from_pretrained`` takes them)."""
        from diffusers import QwenImageEditPlusPipeline

        folder = Path(folder)
        transformer = UniRefTransformer2DModel.from_qwenimage(
            folder / "transformer", torch_dtype=torch_dtype, attention_backend=attention_backend
        )
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        base = QwenImageEditPlusPipeline.from_pretrained(
            folder, transformer=None, local_files_only=True, use_safetensors=True, **kwargs, **components
        )
        return cls.from_qwenimage_edit(base, target_pixels=target_pixels, transformer=transformer)

    @classmethod
    def from_qwenimage_edit(
        cls,
        pipe,
        target_pixels: int = 1024 * 1024,
        transformer: UniRefTransformer2DModel | None = None,
        **transformer_overrides,
    ) -> "UniRefEditPipeline":
        """Wraps a loaded diffusers ``QwenImageEditPlusPipeline`` (no download).

        The transformer is converted with `UniRefTransformer2DModel.from_qwenimage` (sharing the source's
        tensors, no copy; ``transformer_overrides`` such as ``attention_backend`` passed on), unless one of
        ours is given (e.g. loaded from the pipeline folder's shards, with the pipeline loaded without its
        transformer); the VAE and scheduler are shared; the text encoder and processor are wrapped in a
        `QwenVLPromptEncoder` (shared).
        """
        if transformer is None:
            transformer = UniRefTransformer2DModel.from_qwenimage(pipe.transformer, **transformer_overrides)
        return cls(
            transformer=transformer,
            vae=pipe.vae,
            scheduler=pipe.scheduler,
            text_encoder=QwenVLPromptEncoder.from_pipeline(pipe),
            target_pixels=target_pixels,
        )


def __getattr__(name):
    # Deprecated homes, kept for one release: these live in uniref.sampling now.
    import warnings

    from uniref import sampling

    moved = {"JointBatch": "SamplingBatch", "calculate_shift": "calculate_shift", "guided_velocity": "guided_velocity"}
    if name in moved:
        warnings.warn(
            f"uniref.pipelines.edit.{name} is deprecated; use uniref.sampling.{moved[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(sampling, moved[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
