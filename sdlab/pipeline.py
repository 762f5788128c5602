r"""From a prompt to pixels, in named stages: `encode_prompts` -> `prepare_latents` -> `denoise` -> `decode`.

```{math}
\hat\varepsilon = \varepsilon_\theta(z_t, t, \varnothing) + s\,\bigl(\varepsilon_\theta(z_t, t, c) - \varepsilon_\theta(z_t, t, \varnothing)\bigr)
```

*Classifier-free guidance* (`classifier_free_guidance`) runs the U-Net twice per step (batched):
once with the prompt $c$ and once with the empty (or negative) prompt $\varnothing$, and
extrapolates by the guidance scale $s$. `guided_noise` is one guided U-Net evaluation, `denoise`
the sampling loop around it, and `generate` the composition of the stages, with the seed's
signature. Settings left as `None` (size, sampler, steps, guidance scale) come from the model
(`models["diffusion"].sampling`, set by the loader from the checkpoint): SD1.5's are the seed's
(512x512, DDPM, 50 steps, 7.5), the bundled tiny model's 64x64, DPM++ 2M, 20 steps, 5.

**Determinism.** All random numbers come from one CPU generator seeded with `seed` (any integer,
reduced modulo $2^{64}$ as `torch.Generator.manual_seed` does), drawn in diffusers' order. So the same
seed and settings give bit-identical images on one machine and PyTorch build: twice in a process,
in two processes, from two threads at once, with `idle_device` on or off. A batch
(`num_images=N`) gives image k its own generator seeded with `seed + k`: it is the image that seed
gives alone, while the U-Net runs once per step on the whole batch. On another device (a GPU
against the CPU) the *noise* is the same, so the picture is the same one, but the kernels sum in
another order (and may use TF32 or fused attention), so pixels can differ by a few levels; the
same holds across PyTorch versions, CPU types and thread counts.

**Threads.** `generate` holds each model's lock (`sdlab.packing.model_lock`) while it moves,
packs or runs that model, so concurrent calls on the same models are safe and exact; they take
turns on each model, and overlap only in different stages.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import arguments
from .attention import DEFAULT_SLICE_SIZE, attention_backend
from .config import SamplingDefaults
from .diffusion import get_time_embedding
from .errors import ArgumentError, NumericalError
from .images import rescale, to_image_tensor, to_mask_tensor  # noqa: F401 - rescale: the seed's helper, kept here
from .packing import available as packing_available
from .packing import current_weights, model_lock, packed_weights
from .samplers import make_sampler, sampler_names
from .schedule import randn
from .tokenizer import load_tokenizer


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    r"""$\hat\varepsilon = \varepsilon_\varnothing + s\,(\varepsilon_c - \varepsilon_\varnothing)$: $s = 1$
    is the conditional prediction, $s = 0$ the unconditional one, $s > 1$ pushes past it."""
    return scale * (cond - uncond) + uncond


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded to the nearest level."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1) * 255).round().to("cpu", torch.uint8).numpy()


# --------------------------------------------------------------------------------------------------
# Stage 1: text -> context
# --------------------------------------------------------------------------------------------------


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


def prompt_context(tokenizer, clip, prompt: str, uncond_prompt: str | None, guided: bool, num_images: int,
                   device) -> torch.Tensor:
    """The context of `num_images` images of one prompt: (2N, 77, d) as `cat([N x prompt, N x negative])`
    with guidance, (N, 77, d) without. Each prompt is encoded once (a batch of one or two) and
    repeated, so every image sees exactly the context a single call computes."""
    context = encode_prompts(tokenizer, clip, [prompt, uncond_prompt or ""] if guided else [prompt], device)
    return context.repeat_interleave(num_images, dim=0)  # (P, 77, d) -> (P * N, 77, d): each prompt N times


# --------------------------------------------------------------------------------------------------
# Stage 2: the starting point
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inpainting:
    """What the denoising loop needs to repaint only part of a picture."""

    mask: torch.Tensor  # (1, 1, h, w) in latent pixels: 1 = repaint, 0 = keep
    image_latents: torch.Tensor | None  # the input image's latents: the kept region (4-channel U-Net)
    masked_image_latents: torch.Tensor  # the picture with the repainted region blacked out, encoded
    noise: torch.Tensor  # the initial noise: the kept region is re-noised with it to each timestep


def encode_image(encoder, image: torch.Tensor, generator) -> torch.Tensor:
    """Image (1, 3, H, W) in [-1, 1] -> scaled latents, sampled with noise from `generator`; with a list
    of N generators, N samples (N, 4, h, w) of the same image, sample k drawn from generator k."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([encode_image(encoder, image, g) for g in generator])
    dtype = next(encoder.parameters()).dtype
    shape = (image.shape[0], encoder.config.latent_channels, *(s // encoder.config.downscale for s in image.shape[-2:]))
    noise = torch.randn(shape, generator=generator).to(image.device, dtype)
    return encoder(image.to(dtype), noise).float()


def prepare_latents(sampler, shape, generator, device, *, latents=None, encoder=None, image=None,
                    strength: float = 1.0, pixel_mask=None, reads_mask: bool = False) -> tuple[torch.Tensor, Inpainting | None]:
    r"""The latents the loop starts from, and what inpainting needs (else None).

    Text-to-image: pure noise $z_T = \sigma_{\text{init}}\,\epsilon$. Image-to-image (`image`, with
    `sampler.set_strength(strength)` done): the image's latents noised to the first timestep,
    $z_{t_0} = \sqrt{\bar\alpha_{t_0}}\,z_0 + \sqrt{1 - \bar\alpha_{t_0}}\,\epsilon$. Inpainting
    (`pixel_mask`, 1 = repaint) at full strength starts from pure noise. `latents` fixes $\epsilon$.
    The random draws follow diffusers' order (image sample, noise, masked-image sample), so both
    libraries give the same image for a seed. `reads_mask`: a 9-channel inpainting U-Net.
    `generator`: one, or a list of one per batch element (`shape[0]`) that each draw their own.
    """
    full_strength = strength == 1
    image_latents = None
    if image is not None and not (reads_mask and full_strength):
        image_latents = encode_image(encoder, image, generator)
    noise = randn(shape, generator) if latents is None else latents
    noise = noise.to(device, torch.float32)
    if image_latents is not None and not (pixel_mask is not None and full_strength):
        start = sampler.add_noise(image_latents, sampler.timesteps[:1], noise)
    else:  # text-to-image, and inpainting at full strength, start from pure noise
        start = noise * sampler.init_noise_sigma
    if pixel_mask is None:
        return start, None
    masked_image_latents = encode_image(encoder, image * (pixel_mask < 0.5), generator)
    mask = F.interpolate(pixel_mask, size=shape[-2:])  # nearest: (1, 1, H, W) -> (1, 1, h, w)
    mask = mask.expand(shape[0], -1, -1, -1)  # (1, 1, h, w) -> (B, 1, h, w), a view
    return start, Inpainting(mask, image_latents, masked_image_latents, noise)


# --------------------------------------------------------------------------------------------------
# Stage 3: denoising
# --------------------------------------------------------------------------------------------------


def uses_autocast(dtype, weights_dtype) -> bool:
    """Whether `dtype` asks for autocast: not None, float32 or the weights' own dtype."""
    return dtype is not None and dtype not in (weights_dtype, torch.float32)


def autocast(device: torch.device, dtype, weights_dtype):
    """Autocast to `dtype` on `device`, or nothing when `uses_autocast` is False."""
    if not uses_autocast(dtype, weights_dtype):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def guided_noise(diffusion, sampler, latents: torch.Tensor, timestep, context: torch.Tensor, cfg_scale=7.5, *,
                 inpainting: Inpainting | None = None, dtype=None) -> torch.Tensor:
    """One guided noise prediction: the U-Net on a batch of two (prompt, negative prompt), then CFG.

    `latents` (B, C, h, w); `context` (2B, 77, d) as `cat([prompts, negative prompts])`, or (B, 77, d)
    with `cfg_scale=None` (no guidance: one U-Net pass). `dtype`: autocast the U-Net (see
    `generate`). Returns the guided prediction in float32, shaped like `latents`.
    """
    weights_dtype = next(diffusion.parameters()).dtype
    model_input = sampler.scale_model_input(latents, timestep)
    if inpainting is not None and diffusion.config.in_channels > latents.shape[1]:  # the U-Net reads the mask
        model_input = torch.cat([model_input, inpainting.mask, inpainting.masked_image_latents], dim=1)  # (B, 9, h, w)
    if cfg_scale is not None:
        model_input = model_input.repeat(2, 1, 1, 1)  # (B, C, h, w) -> (2B, C, h, w)
    time = get_time_embedding(timestep, diffusion.config.time_dim).to(latents.device, weights_dtype)
    with autocast(latents.device, dtype, weights_dtype):
        output = diffusion(model_input.to(weights_dtype), context, time).float()
    if cfg_scale is None:
        return output
    cond, uncond = output.chunk(2)
    return classifier_free_guidance(cond, uncond, cfg_scale)


def keep_known_region(latents, inpainting: Inpainting, sampler, i: int) -> torch.Tensor:
    """Inpainting with any checkpoint: outside the mask, put back the input image noised to the next step."""
    later = sampler.timesteps[i + 1 : i + 2]
    known = sampler.add_noise(inpainting.image_latents, later, inpainting.noise) if len(later) else inpainting.image_latents
    return (1 - inpainting.mask) * known + inpainting.mask * latents


@torch.no_grad()
def denoise(diffusion, sampler, latents: torch.Tensor, context: torch.Tensor, cfg_scale=7.5, *, callback=None,
            inpainting: Inpainting | None = None, dtype=None, progress: bool = False) -> torch.Tensor:
    r"""The sampling loop: for each of `sampler.timesteps`, a guided noise prediction and the sampler's step.

    $z_{t_{i+1}} = \operatorname{step}(z_{t_i}, \hat\varepsilon(z_{t_i}, t_i))$. `cfg_scale=None` runs
    without guidance (`context` then holds the prompts only). `callback(i, timestep, latents,
    noise_pred)` is called after every step with the new latents. With `inpainting` the
    9-channel U-Net reads the mask, or, for any other U-Net, the kept region is re-imposed after
    every step. After every step the latents are checked: NaN or infinity raises `NumericalError`
    naming the step and the likely cause, instead of decoding a black image.
    """
    reads_mask = diffusion.config.in_channels > latents.shape[1]
    context = context.to(next(diffusion.parameters()).dtype)
    timesteps = sampler.timesteps
    for i, timestep in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
        noise_pred = guided_noise(diffusion, sampler, latents, timestep, context, cfg_scale, inpainting=inpainting, dtype=dtype)
        latents = sampler.step(timestep, latents, noise_pred)
        if inpainting is not None and not reads_mask:
            latents = keep_known_region(latents, inpainting, sampler, i)
        if not torch.isfinite(latents).all():
            raise NumericalError(
                f"the latents became NaN or infinite at step {i + 1} of {len(timesteps)} (timestep {int(timestep)}): "
                f"{likely_cause(diffusion, dtype, noise_pred)}"
            )
        if callback is not None:
            callback(i, timestep, latents, noise_pred)
    return latents


def likely_cause(model, dtype, output: torch.Tensor | None = None) -> str:
    """Why a model's result went non-finite: a NaN/inf weight (named), float16 overflow, or the input."""
    for name, weight in current_weights(model):
        if weight.is_floating_point() and weight.numel() and not torch.isfinite(weight).all():
            return f"the weight {name!r} holds NaN or infinity (a damaged checkpoint: load it again or re-download it)"
    if torch.float16 in (dtype, next(model.parameters()).dtype):
        return "float16 overflow; run in float32, or with dtype=torch.bfloat16"
    if output is not None and not torch.isfinite(output).all():
        return "the model's output is non-finite (the inputs or weights hold extreme values); check cfg_scale and latents"
    return "the sampler's update overflowed; check cfg_scale, the latents and the number of steps"


# --------------------------------------------------------------------------------------------------
# Stage 4: latents -> pixels
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode(decoder, latents: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in about [-1, 1], finite or `NumericalError`.

    `tile_size`: decode in overlapping tiles of this many latent pixels (overlap 1/4); a decoder
    without `tiled_forward` (TAESD, `sdlab.taesd`, small at any size) decodes whole. A float16
    decoder runs in float32 (float16 overflows there into black images) and is handed back as it was.
    """
    upcast = next(decoder.parameters()).dtype == torch.float16
    if upcast:
        decoder.float()
    try:
        latents = latents.to(next(decoder.parameters()).dtype)
        if tile_size is None or not hasattr(decoder, "tiled_forward"):
            images = decoder(latents)
        else:
            images = decoder.tiled_forward(latents, tile_size, tile_size // 4)
        if not torch.isfinite(images).all():
            raise NumericalError(f"the VAE decoder's output is NaN or infinite: {likely_cause(decoder, None)}")
    finally:
        if upcast:
            decoder.half()
    return images


# --------------------------------------------------------------------------------------------------
# The composition
# --------------------------------------------------------------------------------------------------


def sampling_settings(models: dict, height=None, width=None, sampler_name=None, n_inference_steps=None,
                      cfg_scale=None) -> dict:
    """The settings `generate` uses: those given, and the model's own defaults for those left None."""
    defaults = getattr(models["diffusion"], "sampling", None) or SamplingDefaults()
    given = {"height": height, "width": width, "sampler_name": sampler_name, "n_inference_steps": n_inference_steps,
             "cfg_scale": cfg_scale}
    own = {"height": defaults.height, "width": defaults.width, "sampler_name": defaults.sampler,
           "n_inference_steps": defaults.steps, "cfg_scale": defaults.cfg_scale}
    return {key: own[key] if value is None else value for key, value in given.items()}


@contextlib.contextmanager
def using(model, device, idle_device=None):
    """Hold `model` for one stage: its lock (threads take turns), on `device`, then on `idle_device`."""
    with model_lock(model):
        model.to(device)
        try:
            yield model
        finally:
            if idle_device is not None:
                model.to(idle_device)


def make_generator(seed: int | None) -> torch.Generator:
    """The one CPU generator of an image: the same seed gives the same noise on every device."""
    generator = torch.Generator("cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def make_generators(seed: int | None, num_images: int = 1) -> list[torch.Generator]:
    """One CPU generator per image, image k's seeded with `seed + k` (modulo 2**64): image k of a batch is
    the image a single call with that seed gives. `seed=None`: a fresh random seed for image 0."""
    first = make_generator(seed)
    base = first.initial_seed()
    return [first] + [make_generator((base + k) % arguments.SEED_MODULUS) for k in range(1, num_images)]


def speed_options(device, idle_device, low_memory, attention_slice_size, vae_tile_size, packed, do_cfg):
    """What `low_memory` and `packed` turn into: (idle_device, packing(model, dtype), attention(), tile size)."""
    if low_memory and idle_device is None and device.type != "cpu":
        idle_device = torch.device("cpu")
    if low_memory and vae_tile_size is None:
        vae_tile_size = 32
    if low_memory and attention_slice_size is None and device.type not in ("cpu", "cuda"):
        attention_slice_size = DEFAULT_SLICE_SIZE
    packed = device.type == "cpu" if packed is None else packed

    @contextlib.contextmanager
    def packing(model, dtype=None):
        """Weights reordered once for oneDNN (CPU), in float32 or, for `dtype=torch.bfloat16`, in bf16
        (cast once: no autocast). Yields the dtype still to autocast to (None: none)."""
        on_cpu = next(model.parameters()).device.type == "cpu"
        if not (packed and on_cpu and packing_available(dtype or torch.float32)):
            yield dtype
            return
        with packed_weights(model, batch=2 if do_cfg else 1, dtype=dtype):
            yield None

    def attention():  # the attention code path of the U-Net and the VAE decoder
        return contextlib.nullcontext() if attention_slice_size is None else attention_backend("sliced", attention_slice_size)

    return idle_device, packing, attention, vae_tile_size


@torch.no_grad()
def generate(
    prompt: str, uncond_prompt: str | None = None, input_image=None, strength: float = 0.8, do_cfg: bool = True,
    cfg_scale: float | None = None, sampler_name: str | None = None, n_inference_steps: int | None = None,
    models: dict | None = None, seed: int | None = None, device=None, idle_device=None, tokenizer=None, *,
    height: int | None = None, width: int | None = None, latents: torch.Tensor | None = None, progress: bool = True,
    callback=None, mask_image=None, dtype: torch.dtype | None = None, low_memory: bool = False,
    attention_slice_size: int | None = None, vae_tile_size: int | None = None, packed: bool | None = None,
    num_images: int = 1,
) -> np.ndarray | list[np.ndarray]:
    """Generate an image; returns it as an (height, width, 3) uint8 array (a list of `num_images` of them).

    - `uncond_prompt`: the negative prompt used by classifier-free guidance (default empty).
    - `input_image` + `strength`: image-to-image; `strength` in (0, 1] is how much of the sampling
      schedule is run from the noised input (1 = ignore the input entirely). A path, a PIL image,
      or an array/tensor (uint8, uint16, bool, floats in [0, 1] or [-1, 1]); see `sdlab.images`.
    - `cfg_scale`, `sampler_name` (one of `sdlab.samplers.sampler_names()`), `n_inference_steps`,
      `height`, `width` (multiples of 8): None takes the model's own (`models["diffusion"].sampling`).
    - `models`: from `preload_models_from_standard_weights` (default: the bundled tiny model).
    - `seed`: any integer (modulo 2**64, as torch); None: a fresh one. `latents`: the initial
      noise (num_images, 4, height/8, width/8), by default drawn from `seed`.
    - `num_images`: a batch of N images of the prompt (one U-Net call per step on 2N with guidance),
      image k exactly the one `seed + k` gives alone; N > 1 returns a list.
    - `cfg_scale=1` (or `do_cfg=False`) skips the unconditional pass: one U-Net batch of N, not 2N
      (the guidance formula at $s = 1$ is the conditional prediction). LCM: `sampler_name="lcm"`,
      4 steps, `cfg_scale=1`, with an LCM-LoRA loaded (`sdlab.lora.load_lora`); with TAESD
      (`models={**models, "decoder": sdlab.taesd.load_taesd(path)}`) its decode is 18x less work.
    - `callback(step, timestep, latents, noise_pred)`: called after every step.
    - `mask_image` (white = repaint) with `input_image`: inpainting. An inpainting checkpoint's
      9-channel U-Net sees the mask and the masked image; with any other the kept region is put
      back after every step, noised to the next timestep (seams can show).

    Every argument is checked first (`ArgumentError`, `DeviceError`, `InputImageError` name it);
    NaN or infinity during sampling raises `NumericalError` instead of returning a black image.

    Speed and memory (the defaults change nothing):

    - `dtype`: run the U-Net in `torch.bfloat16` (CPUs with AVX512-BF16/AMX, GPUs) or
      `torch.float16` (GPUs), whatever the weights' dtype; the sampler's arithmetic, the noise and
      the guidance stay in float32. On the CPU (packed) bf16 weights are cast once and packed for
      the run (`sdlab.packing`; float32 weights stay beside them), elsewhere the U-Net runs under
      autocast. On the CPU (packed) the VAE decoder is packed in bf16 too (on random SD1.5 weights
      its pixels are 0.6 uint8 levels from float32's on average); elsewhere it runs in float32.
      Weights loaded in bf16 (`preload_models_from_standard_weights(..., dtype=torch.bfloat16)`) run
      in bf16 with no `dtype` and half the memory. A float16 VAE decoder is always run in float32,
      where float16 overflows into black images.
    - `low_memory`: tiled VAE decode (`vae_tile_size` latent pixels, default 32), `idle_device`
      defaulting to `"cpu"` on an accelerator, and sliced attention where no fused kernel exists.
    - `attention_slice_size`: explicit attention over this many queries at a time (any device).
    - `vae_tile_size`: tiled VAE decode with tiles of this many latent pixels (overlap 1/4).
    - `packed`: the convolutions and linear layers of the U-Net (float32, or bf16 as above; not under
      autocast) and the VAE decoder run on weights packed once for oneDNN (`sdlab.packing`).
      Default: on the CPU.
    """
    if models is None or (isinstance(models, dict) and not models):
        models = default_models(device)
    call = check_generate_arguments(**locals())  # every argument, checked before any model runs
    clip, diffusion, decoder = models["clip"], models["diffusion"], models["decoder"]
    encoder = models["encoder"] if input_image is not None else None
    device = call["device"] or next(diffusion.parameters()).device
    guided, num_images = call["guided"], call["num_images"]
    idle_device, packing, attention, vae_tile_size = speed_options(
        device, call["idle_device"], low_memory, attention_slice_size, vae_tile_size, packed, guided)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    generators = make_generators(call["seed"], num_images)  # image k: seed + k
    sampler = make_sampler(call["sampler_name"], generators)
    sampler.set_inference_timesteps(call["n_inference_steps"])

    # 1. Text -> context (N, 77, d); with guidance (2N, 77, d): [N x prompt, N x negative prompt].
    with using(clip, device, idle_device):
        context = prompt_context(tokenizer, clip, prompt, uncond_prompt, guided, num_images, device)
    if not torch.isfinite(context).all():
        raise NumericalError(f"the text encoder's output is NaN or infinite: {likely_cause(clip, dtype)}")

    # 2. The starting point: pure noise, or the input image's latents noised to the first timestep.
    image = pixel_mask = None
    if input_image is not None:
        sampler.set_strength(strength)  # skip the first (1 - strength) of the schedule
        image = to_image_tensor(call["image"], call["width"], call["height"]).to(device)
    if mask_image is not None:
        pixel_mask = to_mask_tensor(call["mask"], call["width"], call["height"]).to(device)  # (1, 1, H, W)
    with using(encoder, device, idle_device) if image is not None else contextlib.nullcontext():
        latents, inpainting = prepare_latents(sampler, call["latents_shape"], generators, device, latents=latents,
                                              encoder=encoder, image=image, strength=strength, pixel_mask=pixel_mask,
                                              reads_mask=call["reads_mask"])

    # 3. Denoise: one U-Net call per step on the whole batch (2N with guidance), then the sampler's update.
    with using(diffusion, device, idle_device), packing(diffusion, dtype) as autocast_dtype, attention():
        latents = denoise(diffusion, sampler, latents, context, call["cfg_scale"] if guided else None,
                          callback=callback, inpainting=inpainting, dtype=autocast_dtype, progress=progress)

    # 4. Latents -> pixels, one image at a time (the VAE's memory grows with the batch); packed in bf16
    # under dtype=torch.bfloat16 (2.2x faster in the stored bench), never in float16 (it overflows in the VAE).
    with using(decoder, device, idle_device), attention(), packing(decoder, dtype if dtype == torch.bfloat16 else None):
        images = torch.cat([decode(decoder, latents[k : k + 1], vae_tile_size) for k in range(num_images)])
    images = to_uint8(images)  # (N, H, W, 3)
    return images[0] if num_images == 1 else list(images)


def default_models(device=None) -> dict:
    """The bundled tiny model, loaded on `device` (default the CPU)."""
    from .model_loader import preload_models_from_standard_weights

    return preload_models_from_standard_weights(None, arguments.check_device(device) or "cpu")


def check_generate_arguments(**given) -> dict:
    """Check `generate`'s arguments up front; returns the settings to run with (defaults filled in,
    the seed reduced, images read). Raises `ArgumentError` (or a subclass) naming the argument."""
    models = given["models"]
    arguments.check_models(models, need_encoder=given["input_image"] is not None)
    call = sampling_settings(models, given["height"], given["width"], given["sampler_name"],
                             given["n_inference_steps"], given["cfg_scale"])
    call["reads_mask"] = models["diffusion"].config.in_channels > models["decoder"].config.latent_channels
    check_inputs(given, call)  # what an inpainting checkpoint needs, and the pictures read
    arguments.check_text(given["prompt"], "prompt")
    arguments.check_text(given["uncond_prompt"], "uncond_prompt", optional=True)
    for flag in ("do_cfg", "low_memory", "progress"):
        arguments.check_flag(given[flag], flag)
    if given["packed"] is not None:
        arguments.check_flag(given["packed"], "packed")
    call["cfg_scale"] = arguments.check_real(call["cfg_scale"], "cfg_scale", fix="7.5 is typical, 0 ignores the prompt")
    call["guided"] = given["do_cfg"] and call["cfg_scale"] != 1  # s = 1 is the conditional prediction alone
    call["num_images"] = arguments.check_int(given["num_images"], "num_images", 1, arguments.MAX_IMAGES,
                                             fix="1 for a single image; generate more in several calls")
    given_strength = given["strength"]
    arguments.check_real(given_strength, "strength", 0, 1, open_low=True, fix="1 ignores the input image entirely")
    if not isinstance(call["sampler_name"], str) or call["sampler_name"] not in sampler_names():
        raise ArgumentError(f"sampler_name {call['sampler_name']!r} is unknown; choose one of: {', '.join(sampler_names())}")
    steps = arguments.check_int(call["n_inference_steps"], "n_inference_steps", 1, 1000, fix="20-50 is typical")
    try:  # the sampler's own limits (e.g. 1000 'leading' steps), and whether strength leaves any step
        trial = make_sampler(call["sampler_name"])
        trial.set_inference_timesteps(steps)
        if given["input_image"] is not None:
            trial.set_strength(given_strength)
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    vae = models["decoder"].config
    for name in ("height", "width"):
        call[name] = arguments.check_size(call[name], name, vae.downscale)
    latent_size = (call["height"] // vae.downscale, call["width"] // vae.downscale)
    call["latents_shape"] = (call["num_images"], vae.latent_channels, *latent_size)
    arguments.check_latents(given["latents"], call["latents_shape"])
    call["seed"] = arguments.check_seed(given["seed"])
    call["device"] = arguments.check_device(given["device"], "device")
    call["idle_device"] = arguments.check_device(given["idle_device"], "idle_device")
    check_speed_arguments(given)
    return call


def check_speed_arguments(given: dict) -> None:
    for name in ("attention_slice_size", "vae_tile_size"):
        if given[name] is not None:
            arguments.check_int(given[name], name, 1, fix="or None")
    dtype = given["dtype"]
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ArgumentError(f"dtype must be None, torch.float32, torch.float16 or torch.bfloat16; got {dtype!r}")
    for name in ("callback", "tokenizer"):
        if given[name] is not None and not callable(given[name]):
            raise ArgumentError(f"{name} must be callable or None; got {type(given[name]).__name__}")


def check_inputs(given: dict, call: dict) -> None:
    """Read the input image and mask now (a broken file fails before any model runs)."""
    from .images import check_mask_size, read_picture

    input_image, mask_image = given["input_image"], given["mask_image"]
    if (mask_image is not None or call["reads_mask"]) and input_image is None:
        raise ArgumentError("inpainting needs input_image (the picture to repaint) as well as mask_image")
    if call["reads_mask"] and mask_image is None:
        raise ArgumentError("this is an inpainting checkpoint (its U-Net reads a mask): pass input_image and mask_image")
    call["image"] = None if input_image is None else read_picture(input_image, "input_image", "RGB", "white")
    call["mask"] = None
    if mask_image is not None:
        call["mask"] = read_picture(mask_image, "mask_image", "L", "black")
        check_mask_size(call["mask"].size, call["image"].size)
