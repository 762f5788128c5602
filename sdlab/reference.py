"""The reference libraries' Stable Diffusion, for the tests and `python -m sdlab bench`.

transformers' `CLIPTextModel`, diffusers' `UNet2DConditionModel`, `AutoencoderKL`, schedulers and
pipelines, configured as SD1.5 is and loaded from an original-layout checkpoint through diffusers'
own single-file converters, so that the reference never shares sdlab's key rules. sdlab itself
never needs these libraries: they are imported inside the functions.

* `SCHEDULER_CONFIG`, `reference_configs()`: SD1.5's `scheduler_config.json` and model sizes,
  written out as the reference libraries spell them (not derived from `sdlab.config`).
* `unet_kwargs`, `vae_kwargs`, `reference_unet`, `reference_vae`: the same for any sdlab config
  (the tiny and small test models).
* `reference_models(ckpt)`: the three SD1.5 models with the weights of an original-layout file.
* `diffusers_scheduler(name)`, `reference_pipeline(models, scheduler)`, `reference_tokenizer()`.
"""

from __future__ import annotations

import gc

import torch

from .config import UNetConfig, VAEConfig

SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}  # fmt: skip
#: sdlab's sampler names -> diffusers' scheduler classes (`_karras` names add `use_karras_sigmas`)
SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}  # fmt: skip


def reference_configs():
    """SD1.5's text encoder config (transformers) and U-Net and VAE arguments (diffusers)."""
    from transformers import CLIPTextConfig

    clip = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )  # fmt: skip
    unet = dict(
        sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=512, scaling_factor=0.18215,
    )  # fmt: skip
    return clip, unet, vae


def unet_kwargs(config: UNetConfig) -> dict:
    """`UNet2DConditionModel` arguments for an sdlab U-Net config (diffusers' "attention_head_dim" is
    the number of heads in SD1.x's configs). diffusers ties the sinusoid's width to the first
    block's: where sdlab's `time_dim` differs, `reference_unet` replaces the time embedding."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    kwargs = dict(
        in_channels=config.in_channels, out_channels=config.out_channels, cross_attention_dim=config.d_context,
        attention_head_dim=config.n_head, block_out_channels=tuple(config.channels),
        layers_per_block=config.n_res_blocks, down_block_types=down, up_block_types=up,
        norm_num_groups=config.n_groups,
    )
    if config.time_dim != config.base_channels:
        kwargs["time_embedding_dim"] = 4 * config.time_dim
    return kwargs


def vae_kwargs(config: VAEConfig) -> dict:
    """`AutoencoderKL` arguments for an sdlab VAE config."""
    n = len(config.channels)
    return dict(
        in_channels=config.in_channels, out_channels=config.in_channels, latent_channels=config.latent_channels,
        block_out_channels=tuple(config.channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=config.n_res_blocks,
        norm_num_groups=config.n_groups, scaling_factor=config.scale_factor,
    )


def reference_unet(config: UNetConfig):
    """diffusers' U-Net of this size (random weights, eval mode)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    unet = UNet2DConditionModel(**unet_kwargs(config))
    if config.time_dim != config.base_channels:  # the sinusoid of sdlab's width, as flip_sin_to_cos=True
        unet.time_proj = Timesteps(config.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        unet.time_embedding = TimestepEmbedding(config.time_dim, 4 * config.time_dim)
    return unet.eval()


def reference_vae(config: VAEConfig):
    """diffusers' VAE of this size (random weights, eval mode)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_kwargs(config)).eval()


def empty_reference_models():
    """transformers' CLIP text model and diffusers' U-Net and VAE, SD1.5 sizes, default init, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    clip_config, unet_config, vae_config = reference_configs()
    return CLIPTextModel(clip_config).eval(), UNet2DConditionModel(**unet_config).eval(), AutoencoderKL(**vae_config).eval()


def diffusers_conversions(state_dict, unet, vae):
    """The original-layout checkpoint -> the reference models' state dicts, by diffusers' converters.

    (`unet` and `vae` only lend their configs.) Returns (clip, unet, vae) state dicts.
    """
    from diffusers.loaders import single_file_utils as sfu

    clip = sfu.convert_ldm_clip_checkpoint(state_dict)
    # transformers 5's CLIPTextModel names its parameters without the `text_model.` level
    clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    return (
        clip,
        sfu.convert_ldm_unet_checkpoint(state_dict, unet.config),
        sfu.convert_ldm_vae_checkpoint(state_dict, vae.config),
    )


def reference_models(ckpt=None, state_dict: dict | None = None) -> dict:
    """transformers' CLIPTextModel and diffusers' U-Net and VAE, SD1.5 sizes, with the weights of the
    original-layout `.safetensors` file `ckpt` (or of `state_dict`), as float32, taken in place: the
    models are built on the meta device, so the weights are in memory once."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if state_dict is None:
        from safetensors.torch import load_file

        state_dict = load_file(str(ckpt))
    clip_config, unet_config, vae_config = reference_configs()
    clip = CLIPTextModel(clip_config)  # not on "meta": it has non-persistent buffers
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    converted = dict(zip(("clip", "unet", "vae"), diffusers_conversions(state_dict, unet, vae)))
    del state_dict  # what the converters did not take (e.g. the schedule buffers) can go now
    models = {}
    for name, model in (("clip", clip), ("unet", unet), ("vae", vae)):
        weights = {k: v.float() if v.is_floating_point() else v for k, v in converted.pop(name).items()}
        weights.pop("embeddings.position_ids", None)  # a constant buffer, not a weight
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise RuntimeError(f"reference {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError(f"reference {name} kept tensors on the meta device")
        models[name] = model.eval()
    gc.collect()
    return models


def diffusers_scheduler(name: str, **config):
    """diffusers' scheduler for the sdlab sampler `name` (see `sdlab.samplers.sampler_names`), from
    SD1.5's config; `config` overrides entries (e.g. `timestep_spacing`, `prediction_type`).

    diffusers' Euler ancestral has no Karras option: for `"euler_a_karras"` it gets the Karras
    sigmas and timesteps of `EulerDiscreteScheduler(use_karras_sigmas=True)`.
    """
    import diffusers

    base = name.removesuffix("_karras")
    if base not in SCHEDULERS:
        raise ValueError(f"no diffusers scheduler for {name!r}; choose one of {list(SCHEDULERS)} (+ _karras)")
    if name == "euler_a_karras":
        return _euler_ancestral_karras().from_config(SCHEDULER_CONFIG, **config)
    karras = {"use_karras_sigmas": True} if name.endswith("_karras") else {}
    return getattr(diffusers, SCHEDULERS[base]).from_config(SCHEDULER_CONFIG, **karras, **config)


def _euler_ancestral_karras():
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    class EulerAncestralKarras(EulerAncestralDiscreteScheduler):
        def set_timesteps(self, n, device=None):
            super().set_timesteps(n)
            karras = EulerDiscreteScheduler.from_config(self.config, use_karras_sigmas=True)
            karras.set_timesteps(n)
            self.sigmas, self.timesteps = karras.sigmas.clone(), karras.timesteps.clone()

    return EulerAncestralKarras


def reference_tokenizer():
    """transformers' CLIPTokenizer from the same BPE vocabulary that sdlab ships."""
    import tempfile

    from transformers import CLIPTokenizer

    from .tokenizer import vocab_files

    with tempfile.TemporaryDirectory() as directory:
        vocab_files(directory)
        return CLIPTokenizer.from_pretrained(directory)


def reference_pipeline(models: dict, scheduler, unet=None, inpaint: bool = False):
    """diffusers' text-to-image (or inpainting) pipeline around the reference `models`
    ({"clip", "unet", "vae"}); `unet` replaces models["unet"]."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    kind = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = kind(
        vae=models["vae"], text_encoder=models["clip"], tokenizer=reference_tokenizer(),
        unet=unet or models["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
