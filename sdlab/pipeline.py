r"""From a prompt to pixels: tokenize -> encode text -> denoise latents with guidance -> decode.

```{math}
\hat\varepsilon = \varepsilon_\theta(z_t, t, \varnothing) + s\,\bigl(\varepsilon_\theta(z_t, t, c) - \varepsilon_\theta(z_t, t, \varnothing)\bigr)
```

*Classifier-free guidance* runs the U-Net twice per step (batched): once with the prompt $c$ and
once with the empty (or negative) prompt $\varnothing$, and extrapolates by the guidance scale $s$.
`generate` keeps the seed's signature and defaults. All random numbers come from one CPU generator
seeded with `seed`, so a seed gives the same image on any device; pass `latents` to fix the initial
noise yourself (e.g. to compare with another library).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .attention import DEFAULT_SLICE_SIZE, attention_backend
from .diffusion import get_time_embedding
from .packing import packed_weights
from .samplers import make_sampler

WIDTH = 512
HEIGHT = 512
LATENTS_WIDTH = WIDTH // 8
LATENTS_HEIGHT = HEIGHT // 8


def rescale(x, old_range, new_range, clamp: bool = False):
    """Map `x` linearly from `old_range` to `new_range` (the seed's helper)."""
    old_min, old_max = old_range
    new_min, new_max = new_range
    x = (x - old_min) * (new_max - new_min) / (old_max - old_min) + new_min
    return x.clamp(new_min, new_max) if clamp else x


def _open(image):
    """A path is opened as a PIL image; anything else is returned as it is."""
    return Image.open(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else image


def to_image_tensor(image, width: int, height: int) -> torch.Tensor:
    """A PIL image, HxWx3 uint8 array or file path -> (1, 3, height, width) float32 in [-1, 1]."""
    image = _open(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"input_image must be an HxWx3 array; got shape {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise TypeError(f"input_image must be a PIL image, an HxWx3 uint8 array or a path; got {type(image).__name__}")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return rescale(tensor, (0, 255), (-1, 1))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded to the nearest level."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1) * 255).round().to("cpu", torch.uint8).numpy()


def to_mask_tensor(mask, width: int, height: int) -> torch.Tensor:
    """A mask (white = repaint) -> (1, 1, height, width) float32 of 0s and 1s, binarized at 0.5."""
    mask = _open(mask)
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(mask.astype(np.uint8) if mask.dtype != np.uint8 else mask)
    if not isinstance(mask, Image.Image):
        raise TypeError(f"mask_image must be a PIL image, a uint8 array or a path; got {type(mask).__name__}")
    if mask.mode != "L":
        warnings.warn(f"mask_image has mode {mask.mode!r}, not single-channel 'L'; converting it to grayscale")
        mask = mask.convert("L")
    if mask.size != (width, height):
        warnings.warn(f"mask_image is {mask.size[0]}x{mask.size[1]}, the image {width}x{height}; resizing the mask")
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]


def encode_image(encoder, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Image (1, 3, H, W) in [-1, 1] -> scaled latents, sampled with noise from `generator`."""
    dtype = next(encoder.parameters()).dtype
    shape = (image.shape[0], encoder.config.latent_channels, *(s // encoder.config.downscale for s in image.shape[-2:]))
    noise = torch.randn(shape, generator=generator).to(image.device, dtype)
    return encoder(image.to(dtype), noise).float()


def encode_prompts(tokenizer, clip, prompts: list[str], device) -> torch.Tensor:
    """Prompts -> CLIP's contextual embeddings (B, 77, d). Over-long prompts warn, then are truncated."""
    n_token = clip.config.n_token
    if not hasattr(tokenizer, "bpe"):  # another library's tokenizer: warn here (sdlab's own warns itself)
        for prompt in prompts:
            length = len(tokenizer(prompt).input_ids)
            if length > n_token:
                warnings.warn(f"the prompt is {length} tokens long; the text encoder reads {n_token}, the rest is dropped")
    ids = tokenizer(prompts, padding="max_length", max_length=n_token, truncation=True).input_ids
    return clip(torch.tensor(ids, dtype=torch.long, device=device))


def check_arguments(prompt, strength, height, width, downscale: int) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string; got {type(prompt).__name__}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (1 = ignore the input image entirely); got {strength}")
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size <= 0 or size % downscale:
            raise ValueError(f"{name} must be a positive multiple of {downscale} (e.g. 512); got {size!r}")


def uses_autocast(dtype, weights_dtype) -> bool:
    """Whether `dtype` asks for autocast: not None, float32 or the weights' own dtype."""
    return dtype is not None and dtype not in (weights_dtype, torch.float32)


def autocast(device: torch.device, dtype, weights_dtype):
    """Autocast to `dtype` on `device`, or nothing when `uses_autocast` is False."""
    if not uses_autocast(dtype, weights_dtype):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def generate(
    prompt: str,
    uncond_prompt: str | None = None,
    input_image=None,
    strength: float = 0.8,
    do_cfg: bool = True,
    cfg_scale: float = 7.5,
    sampler_name: str = "ddpm",
    n_inference_steps: int = 50,
    models: dict | None = None,
    seed: int | None = None,
    device=None,
    idle_device=None,
    tokenizer=None,
    *,
    height: int = HEIGHT,
    width: int = WIDTH,
    latents: torch.Tensor | None = None,
    progress: bool = True,
    callback=None,
    mask_image=None,
    dtype: torch.dtype | None = None,
    low_memory: bool = False,
    attention_slice_size: int | None = None,
    vae_tile_size: int | None = None,
    packed: bool | None = None,
) -> np.ndarray:
    """Generate one image; returns it as an (height, width, 3) uint8 array.

    - `uncond_prompt`: the negative prompt used by classifier-free guidance (default empty).
    - `input_image` + `strength`: image-to-image; `strength` in (0, 1] is how much of the sampling
      schedule is run from the noised input (1 = ignore the input entirely).
    - `sampler_name`: one of `sdlab.samplers.sampler_names()`.
    - `models`: from `preload_models_from_standard_weights` (default: the bundled tiny model).
    - `latents`: the initial noise (1, 4, height/8, width/8); default drawn from `seed`.
    - `callback(step, timestep, latents, noise_pred)`: called after every step.
    - `mask_image` (white = repaint, black = keep) with `input_image`: inpainting. With an
      inpainting checkpoint (9-channel U-Net, detected from the file) the U-Net sees the mask and
      the masked image; with any other checkpoint the kept region is re-imposed after every step,
      noised to the next timestep (the model never sees the mask, so seams can show).

    Speed and memory (the defaults change nothing):

    - `dtype`: run the U-Net under autocast to `torch.bfloat16` (CPUs with AVX512-BF16/AMX, GPUs)
      or `torch.float16` (GPUs), whatever the weights' dtype; the sampler's arithmetic, the noise
      and the guidance stay in float32. A float16 VAE decoder is always run in float32, where
      float16 overflows into black images.
    - `low_memory`: tiled VAE decode (`vae_tile_size` latent pixels, default 32), `idle_device`
      defaulting to `"cpu"` on an accelerator (each model leaves the device after its turn), and
      sliced attention where no fused attention kernel exists (on CPU and CUDA the default fused
      kernel never builds the full attention matrix anyway).
    - `attention_slice_size`: explicit attention over this many queries at a time (any device).
    - `vae_tile_size`: tiled VAE decode with tiles of this many latent pixels (overlap 1/4).
    - `packed`: run the float32 convolutions and linear layers of the U-Net (unless under autocast)
      and of the VAE decoder on weights reordered once for oneDNN (`sdlab.packing`: a U-Net step
      5-9% and a VAE decode 10-15% faster on SD1.5, equal up to rounding). Default: on on the CPU.
    """
    if not models:
        from .model_loader import preload_models_from_standard_weights

        models = preload_models_from_standard_weights(None, device or "cpu")
    missing = {"clip", "decoder", "diffusion"} - set(models) | ({"encoder"} - set(models) if input_image is not None else set())
    if missing:
        raise ValueError(f"models is missing {sorted(missing)}; use preload_models_from_standard_weights(path)")
    clip, decoder, diffusion = models["clip"], models["decoder"], models["diffusion"]
    vae_config = decoder.config
    check_arguments(prompt, strength, height, width, vae_config.downscale)
    device = torch.device(device or next(diffusion.parameters()).device)
    if low_memory and idle_device is None and device.type != "cpu":
        idle_device = "cpu"
    if low_memory and vae_tile_size is None:
        vae_tile_size = 32
    if low_memory and attention_slice_size is None and device.type not in ("cpu", "cuda"):
        attention_slice_size = DEFAULT_SLICE_SIZE

    if packed is None:
        packed = device.type == "cpu"

    def packing(model, under_autocast=False):  # weights reordered once for oneDNN (float32, CPU)
        if not packed or under_autocast:
            return contextlib.nullcontext()
        return packed_weights(model, batch=2 if do_cfg else 1)

    def attention():  # the attention code path of the U-Net and the VAE decoder
        if attention_slice_size is None:
            return contextlib.nullcontext()
        return attention_backend("sliced", attention_slice_size)

    to_idle = (lambda m: m.to(idle_device)) if idle_device else (lambda m: m)
    if tokenizer is None:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer()

    generator = torch.Generator("cpu")  # CPU noise: the same seed gives the same image everywhere
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    sampler = make_sampler(sampler_name, generator)  # an unknown name fails here, listing the valid ones
    sampler.set_inference_timesteps(n_inference_steps)

    # 1. Text -> context (B, 77, 768); with guidance the batch is [prompt, negative prompt].
    clip.to(device)
    prompts = [prompt, uncond_prompt or ""] if do_cfg else [prompt]
    context = encode_prompts(tokenizer, clip, prompts, device)
    to_idle(clip)

    latents_shape = (1, vae_config.latent_channels, height // vae_config.downscale, width // vae_config.downscale)
    if latents is not None and tuple(latents.shape) != latents_shape:
        raise ValueError(f"latents must have shape {latents_shape} for a {height}x{width} image; got {tuple(latents.shape)}")

    # 2. The starting point: pure noise, or the input image's latents noised to the first timestep.
    #    Random draws happen in diffusers' order, so that both give the same image for a seed.
    inpainting_model = diffusion.config.in_channels > vae_config.latent_channels
    if mask_image is not None or inpainting_model:
        if input_image is None:
            raise ValueError("inpainting needs input_image (the picture to repaint) as well as mask_image")
        if mask_image is None:
            raise ValueError("this is an inpainting checkpoint (its U-Net reads a mask): pass input_image and mask_image")
    image_latents = mask = masked_image_latents = None
    if input_image is not None:
        encoder = models["encoder"].to(device)
        image = to_image_tensor(input_image, width, height).to(device)
        sampler.set_strength(strength)  # skip the first (1 - strength) of the schedule
        if not inpainting_model or strength < 1:
            image_latents = encode_image(encoder, image, generator)
    noise = torch.randn(latents_shape, generator=generator) if latents is None else latents
    noise = noise.to(device, torch.float32)
    if image_latents is not None and not (mask_image is not None and strength == 1):
        latents = sampler.add_noise(image_latents, sampler.timesteps[:1], noise)
    else:  # text-to-image, and inpainting at full strength, start from pure noise
        latents = noise * sampler.init_noise_sigma
    if mask_image is not None:
        pixel_mask = to_mask_tensor(mask_image, width, height).to(device)  # (1, 1, H, W), 1 = repaint
        masked_image_latents = encode_image(encoder, image * (pixel_mask < 0.5), generator)
        mask = F.interpolate(pixel_mask, size=latents_shape[-2:])  # nearest: (1, 1, h, w)
    if input_image is not None:
        to_idle(encoder)

    # 3. Denoise: one U-Net call per step (batch of 2 with guidance), then the sampler's update.
    diffusion.to(device)
    weights_dtype = next(diffusion.parameters()).dtype
    context = context.to(weights_dtype)
    timesteps = sampler.timesteps
    with packing(diffusion, under_autocast=uses_autocast(dtype, weights_dtype)):
        for i, timestep in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
            model_input = sampler.scale_model_input(latents, timestep)
            if inpainting_model:  # the inpainting U-Net also reads the mask and the masked image
                model_input = torch.cat([model_input, mask, masked_image_latents], dim=1)  # (1, 9, h, w)
            if do_cfg:
                model_input = model_input.repeat(2, 1, 1, 1)  # (1, C, h, w) -> (2, C, h, w)
            time = get_time_embedding(timestep, diffusion.config.time_dim).to(device, weights_dtype)
            with attention(), autocast(device, dtype, weights_dtype):
                model_output = diffusion(model_input.to(weights_dtype), context, time).float()
            if do_cfg:
                output_cond, output_uncond = model_output.chunk(2)
                model_output = cfg_scale * (output_cond - output_uncond) + output_uncond
            latents = sampler.step(timestep, latents, model_output)
            if mask is not None and not inpainting_model:
                # Any SD checkpoint: outside the mask, put back the input image noised to the next step.
                known = image_latents if i == len(timesteps) - 1 else sampler.add_noise(image_latents, timesteps[i + 1 : i + 2], noise)
                latents = (1 - mask) * known + mask * latents
            if callback is not None:
                callback(i, timestep, latents, model_output)
    to_idle(diffusion)

    # 4. Latents -> pixels.
    decoder.to(device)
    upcast = next(decoder.parameters()).dtype == torch.float16  # fp16 overflows in the decoder
    if upcast:
        decoder.float()
    decode = decoder if vae_tile_size is None else (lambda z: decoder.tiled_forward(z, vae_tile_size, vae_tile_size // 4))
    try:
        with attention(), packing(decoder):
            images = decode(latents.to(next(decoder.parameters()).dtype))
    finally:
        if upcast:
            decoder.half()
    to_idle(decoder)
    return to_uint8(images)[0]
