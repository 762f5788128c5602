"""Reference models (diffusers / transformers) and a random checkpoint in the real SD1.5 layout.

The random file is made from the reference libraries' own models with their own initialisation
(which keeps activations O(1)), written under the original keys found through diffusers'
single-file converter. The reference side then loads that file back through the same converter,
while sdlab loads it through its own rules: two independent key mappings that must agree.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlab.bench import reference_configs  # the SD1.5 sizes in the reference libraries' terms

MANIFEST = Path(__file__).resolve().parents[1].parent / "shared" / "sd15" / "manifest.tsv"
MANIFEST_EXTRA = MANIFEST.with_name("manifest_extra.tsv")
SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def manifest_path() -> Path:
    for candidate in (MANIFEST, Path.cwd().parent / "shared" / "sd15" / "manifest.tsv"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"the SD1.5 manifest is expected at {MANIFEST}")


def read_manifest(path=None) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype name), in file order."""
    rows = {}
    for line in Path(path or manifest_path()).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype)
    return rows


def empty_reference_models():
    """diffusers' U-Net and VAE and transformers' CLIP text model, SD1.5 sizes, default init."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    clip_config, unet_config, vae_config = reference_configs()
    return CLIPTextModel(clip_config).eval(), UNet2DConditionModel(**unet_config).eval(), AutoencoderKL(**vae_config).eval()


def diffusers_conversions(state_dict, unet, vae):
    """The original-layout checkpoint -> the reference models' state dicts, by diffusers' converters."""
    from diffusers.loaders import single_file_utils as sfu

    clip = sfu.convert_ldm_clip_checkpoint(state_dict)
    # transformers 5's CLIPTextModel names its parameters without the `text_model.` level
    clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    return (
        clip,
        sfu.convert_ldm_unet_checkpoint(state_dict, unet.config),
        sfu.convert_ldm_vae_checkpoint(state_dict, vae.config),
    )


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers that the original LatentDiffusion model stores (float32 [1000])."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    values = [
        betas, alphas_cumprod, prev, alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt(),
        (1 - alphas_cumprod).log(), (1 / alphas_cumprod).sqrt(), (1 / alphas_cumprod - 1).sqrt(),
        posterior_variance, posterior_variance.clamp(min=1e-20).log(),
        betas * prev.sqrt() / (1 - alphas_cumprod), (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    ]
    return {k: v.float() for k, v in zip(SCHEDULE_KEYS, values)}


def random_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint with exactly the real file's keys, shapes and dtypes."""
    manifest = read_manifest()
    torch.manual_seed(seed)
    clip, unet, vae = empty_reference_models()
    # Which original key does each reference parameter come from? Tag every original tensor with
    # its index and see where diffusers' converter puts it.
    model_keys = [k for k in manifest if not k.startswith(SCHEDULE_KEYS) and not k.endswith("position_ids")]
    tags = {k: torch.tensor(float(i)).expand(manifest[k][0]) for i, k in enumerate(model_keys)}
    origin = {}
    for prefix, converted in zip(("clip", "unet", "vae"), diffusers_conversions(tags, unet, vae)):
        for key, tagged in converted.items():
            origin[(prefix, key)] = model_keys[int(tagged.reshape(-1)[0])]
    state = {}
    for prefix, model in (("clip", clip), ("unet", unet), ("vae", vae)):
        for key, tensor in model.state_dict().items():
            if (prefix, key) not in origin:
                continue  # e.g. transformers' position_ids buffer
            original = origin[(prefix, key)]
            state[original] = tensor.detach().reshape(manifest[original][0]).contiguous()
    del clip, unet, vae
    state.update(schedule_buffers())
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    missing = set(manifest) - set(state)
    if missing:
        raise AssertionError(f"the random checkpoint lacks {sorted(missing)[:5]}")
    return {k: state[k] for k in manifest}  # file order


def reference_tokenizer():
    """transformers' CLIPTokenizer from the same BPE vocabulary that sdlab ships."""
    import tempfile

    from transformers import CLIPTokenizer

    from sdlab.tokenizer import vocab_files

    with tempfile.TemporaryDirectory() as directory:
        vocab_files(directory)
        return CLIPTokenizer.from_pretrained(directory)


def reference_pipeline(reference: dict, scheduler, unet=None, inpaint: bool = False):
    """diffusers' text-to-image (or inpainting) pipeline around the reference models."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    kind = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = kind(
        vae=reference["vae"], text_encoder=reference["clip"], tokenizer=reference_tokenizer(),
        unet=unet or reference["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
