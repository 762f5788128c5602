"""Parity of every sdlab sampler with the diffusers scheduler of the same name, configured from
SD1.5's scheduler_config.json: timesteps, initial noise scale, model-input scaling, every step of
whole trajectories (noise draws included), image-to-image, and errors for bad arguments."""

import warnings

import pytest
import torch

from sdlab.ddpm import DDPMSampler
from sdlab.errors import ArgumentError
from sdlab.reference import diffusers_scheduler
from sdlab.samplers import SAMPLERS, make_sampler, sampler_names
from sdlab.schedule import PREDICTION_TYPES, ancestral_sigmas, predict_x0, to_eps

# diffusers' own schedulers trip numpy 2's `__array__(copy=...)` deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")

SHAPE = (2, 4, 8, 8)
TOL = 1e-5

# case -> (sdlab sampler name, its options, extra arguments of diffusers' step); the diffusers
# scheduler is `diffusers_scheduler(name)` (SD1.5's config; Euler ancestral given Karras sigmas)
CASES = {
    "ddpm": ("ddpm", {}, {"random": True}),
    "ddim": ("ddim", {}, {}),
    "ddim_eta1": ("ddim", {"eta": 1.0}, {"random": True, "eta": 1.0}),
    "euler": ("euler", {}, {}),
    "euler_karras": ("euler_karras", {}, {}),
    "euler_a": ("euler_a", {}, {"random": True}),
    "euler_a_karras": ("euler_a_karras", {}, {"random": True}),
    "dpmpp_2m": ("dpmpp_2m", {}, {}),
    "dpmpp_2m_karras": ("dpmpp_2m_karras", {}, {}),
    "lcm": ("lcm", {}, {"random": True}),  # fresh noise between steps; no spacing of its own (as diffusers)
}

BASE = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def fake_unet(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the U-Net's epsilon prediction, depending on (x, t)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.8 * torch.tanh(x) + 0.3 * BASE * torch.cos(t / 97.0)


def both(case: str, seed: int = 1, **config):
    """(ours, theirs, diffusers step kwargs, generator for theirs) for one test case."""
    name, options, step_kwargs = CASES[case]
    ours = make_sampler(name, torch.Generator().manual_seed(seed), **options, **config)
    theirs = diffusers_scheduler(name, **config)
    step_kwargs = dict(step_kwargs)
    generator = torch.Generator().manual_seed(seed)
    if step_kwargs.pop("random", False):
        step_kwargs["generator"] = generator
    return ours, theirs, step_kwargs, generator


def run_both(ours, theirs, step_kwargs, x_ours, x_theirs, timesteps):
    """Run both samplers over `timesteps`, asserting parity of model inputs and latents at each step."""
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in timesteps:
            in_ours, in_theirs = ours.scale_model_input(x_ours, t), theirs.scale_model_input(x_theirs, t)
            worst = max(worst, (in_ours - in_theirs).abs().max().item())
            x_ours = ours.step(t, x_ours, fake_unet(in_ours, t))
            x_theirs = theirs.step(fake_unet(in_theirs, t), t, x_theirs, **step_kwargs).prev_sample
            worst = max(worst, (x_ours - x_theirs).abs().max().item())
            assert worst <= TOL, f"step at t={float(t)}: max |diff| {worst}"
    assert torch.isfinite(x_ours).all()
    return worst


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_diffusers(case, spacing, steps):
    ours, theirs, step_kwargs, _ = both(case, timestep_spacing=spacing)
    ours.set_inference_timesteps(steps)
    theirs.set_timesteps(steps)

    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert len(ours.timesteps) == steps
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    run_both(ours, theirs, step_kwargs, noise * ours.init_noise_sigma, noise * theirs.init_noise_sigma, ours.timesteps)


@pytest.mark.parametrize("case", list(CASES))
def test_default_spacing_follows_sd15_config(case):
    """No `timestep_spacing` in SD1.5's config: diffusers' class defaults ("leading" for DDPM/DDIM)."""
    ours, theirs, step_kwargs, _ = both(case)
    ours.set_inference_timesteps(30)
    theirs.set_timesteps(30)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    run_both(ours, theirs, step_kwargs, noise * ours.init_noise_sigma, noise * theirs.init_noise_sigma, ours.timesteps)


def test_ddpm_default_schedule():
    sampler = DDPMSampler(torch.Generator().manual_seed(0))
    sampler.set_inference_timesteps(50)
    assert sampler.timesteps.tolist() == list(range(981, 0, -20))
    assert sampler.init_noise_sigma == 1.0


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("case", list(CASES))
def test_img2img_matches_diffusers(case, strength):
    """diffusers' StableDiffusionImg2ImgPipeline logic vs ours: set_strength + add_noise + loop."""
    steps = 20
    ours, theirs, step_kwargs, generator = both(case, seed=5)
    image_latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))

    theirs.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = theirs.timesteps[t_start * theirs.order :]
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(t_start * theirs.order)
    noise = torch.randn(SHAPE, generator=generator)  # what diffusers' randn_tensor draws
    x_theirs = theirs.add_noise(image_latents, noise, timesteps[:1].repeat(SHAPE[0]))

    ours.set_inference_timesteps(steps)
    ours.set_strength(strength)
    assert ours.start_step == t_start
    assert torch.equal(ours.timesteps, timesteps)
    x_ours = ours.add_noise(image_latents, ours.timesteps[0])  # noise from the sampler's generator
    assert (x_ours - x_theirs).abs().max().item() <= TOL

    run_both(ours, theirs, step_kwargs, x_ours, x_theirs, ours.timesteps)


@pytest.mark.parametrize("name", sampler_names())
def test_add_noise_per_sample_timesteps_and_explicit_noise(name):
    sampler = make_sampler(name, torch.Generator().manual_seed(0))
    sampler.set_inference_timesteps(10)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = sampler.timesteps[[2, 7]]
    mixed = sampler.add_noise(x0, t, noise)
    for b in range(2):
        alone = sampler.add_noise(x0[b : b + 1], t[b], noise[b : b + 1])
        assert torch.equal(mixed[b : b + 1], alone)
    # noise=None draws exactly the noise a same-seeded generator gives
    assert torch.equal(sampler.add_noise(x0, sampler.timesteps[0]), sampler.add_noise(x0, sampler.timesteps[0], noise))


def test_seed_style_ddpm_loop():
    """Code written for the seed's DDPMSampler runs unchanged."""
    generator = torch.Generator().manual_seed(42)
    sampler = DDPMSampler(generator)
    sampler.set_inference_timesteps(10)
    sampler.set_strength(strength=0.5)
    assert sampler.start_step == 5 and len(sampler.timesteps) == 5
    latents = sampler.add_noise(torch.zeros(SHAPE), sampler.timesteps[0])
    for timestep in sampler.timesteps:
        latents = sampler.step(timestep, latents, fake_unet(latents, timestep))
    assert latents.shape == SHAPE and torch.isfinite(latents).all()


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler_a", "ddpm"])
def test_restart_resets_state(name):
    """set_inference_timesteps / set_strength restart the trajectory (step counter, multistep history);
    calling set_strength twice does not compound."""

    def run(sampler, n_steps=None):
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)) * sampler.init_noise_sigma
        for t in sampler.timesteps[:n_steps]:
            x = sampler.step(t, x, fake_unet(sampler.scale_model_input(x, t), t))
        return x

    fresh = make_sampler(name, torch.Generator().manual_seed(0))
    fresh.set_inference_timesteps(8)
    expected = run(fresh)

    reused = make_sampler(name, torch.Generator().manual_seed(0))
    reused.set_inference_timesteps(8)
    run(reused, 3)
    reused.generator.manual_seed(0)
    reused.set_inference_timesteps(8)
    assert torch.equal(run(reused), expected)

    reused.set_strength(0.5)
    reused.set_strength(0.5)
    assert len(reused.timesteps) == 4 and reused.start_step == 4


def test_stepping_past_the_end_is_an_error():
    sampler = make_sampler("euler", None)
    sampler.set_inference_timesteps(2)
    x = torch.zeros(SHAPE)
    for t in sampler.timesteps:
        x = sampler.step(t, x, fake_unet(x, t))
    with pytest.raises(RuntimeError, match="set_inference_timesteps"):
        sampler.step(sampler.timesteps[-1], x, x)


def test_registry():
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "lcm"}
    assert sampler_names() == [
        "ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "euler_karras", "euler_a_karras", "dpmpp_2m_karras"
    ]  # fmt: skip
    for name in sampler_names():
        sampler = make_sampler(name, None)
        assert isinstance(sampler, SAMPLERS[name.removesuffix("_karras")])
        assert getattr(sampler, "karras_sigmas", False) == name.endswith("_karras")


@pytest.mark.parametrize("bad", ["plms", "ddim_karras", "Euler", ""])
def test_unknown_sampler_name_lists_valid_names(bad):
    with pytest.raises(ValueError) as error:
        make_sampler(bad, None)
    for name in sampler_names():
        assert name in str(error.value)


@pytest.mark.parametrize("name", sampler_names())
def test_bad_arguments(name):
    sampler = make_sampler(name, None)
    for steps in (0, -3, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sampler.set_inference_timesteps(steps)
    sampler.set_inference_timesteps(50)
    for strength in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            sampler.set_strength(strength)
    with pytest.raises(ValueError, match="0 steps to denoise"):
        sampler.set_strength(0.01)  # int(50 * 0.01) = 0 steps left
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_sampler(name, None, timestep_spacing="uniform")
    with pytest.raises(ArgumentError, match="num_inference_steps"):  # all of them sdlab's own ValueError
        sampler.set_inference_timesteps(0)


@pytest.mark.parametrize("name", ["ddpm", "euler", "euler_a_karras", "dpmpp_2m"])
def test_timestep_not_in_schedule(name):
    sampler = make_sampler(name, None)
    sampler.set_inference_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="not in this sampler's schedule"):
        if name == "ddpm":  # DDPM looks the next timestep up; VP add_noise takes any training timestep
            sampler.step(7, x, x)
        else:  # sigma samplers know the noise level of their own timesteps only
            sampler.add_noise(x, 7)


def test_negative_eta():
    with pytest.raises(ValueError, match="eta must be >= 0"):
        make_sampler("ddim", None, eta=-0.1)


def test_too_many_leading_steps_is_a_clear_error():
    """1000 "leading" steps shifted by steps_offset=1 would need t=1000 (diffusers fails with an IndexError)."""
    with pytest.raises(ValueError, match="past the last training step 999"):
        make_sampler("ddpm", torch.Generator()).set_inference_timesteps(1000)
    make_sampler("ddpm", torch.Generator(), timestep_spacing="linspace").set_inference_timesteps(1000)


# ----- the shared parameterisation helpers (sdlab.schedule) ----------------------------------


@pytest.mark.parametrize("steps", [4, 20])
@pytest.mark.parametrize("case", list(CASES))
def test_v_prediction_trajectory_matches_diffusers(case, steps):
    """The same samplers driven by a v-predicting model: diffusers' `prediction_type="v_prediction"`."""
    ours, theirs, step_kwargs, _ = both(case, prediction_type="v_prediction")
    assert ours.prediction_type == theirs.config.prediction_type == "v_prediction"
    ours.set_inference_timesteps(steps)
    theirs.set_timesteps(steps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    run_both(ours, theirs, step_kwargs, noise * ours.init_noise_sigma, noise * theirs.init_noise_sigma, ours.timesteps)


@pytest.mark.parametrize("t", [0, 20, 500, 999])
def test_predict_x0_and_to_eps_invert_diffusers_velocity(t):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and diffusers' v = get_velocity(x0, eps, t): both helpers
    recover x0 and eps from either prediction, on the U-Net's x_t and on the Euler samplers' x~."""
    scheduler = diffusers_scheduler("ddpm")
    x0, eps = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(t))
    timesteps = torch.tensor([t] * SHAPE[0])
    x_t = scheduler.add_noise(x0, eps, timesteps)
    v = scheduler.get_velocity(x0, eps, timesteps)
    alpha_bar = scheduler.alphas_cumprod[t]
    alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    for output, kind in ((eps, "epsilon"), (v, "v_prediction")):
        assert (predict_x0(output, x_t, alpha, sigma, kind) - x0).abs().max() <= 1e-4 / alpha
        assert (to_eps(output, x_t, alpha, sigma, kind) - eps).abs().max() <= 1e-5 / sigma
    assert to_eps(eps, x_t, alpha, sigma) is eps  # epsilon: the output itself, untouched
    # The Euler samplers' latents x~ = x_t / alpha = x0 + sigma_t eps (alpha = 1); diffusers' formula
    # of EulerDiscreteScheduler: x0 = v * (-s / sqrt(s^2 + 1)) + x~ / (s^2 + 1).
    s = sigma / alpha
    x_tilde = x_t / alpha
    euler_x0 = v * (-s / (s**2 + 1) ** 0.5) + x_tilde / (s**2 + 1)
    assert (predict_x0(v, x_tilde, 1.0, s, "v_prediction") - euler_x0).abs().max() <= 1e-5
    assert (predict_x0(eps, x_tilde, 1.0, s) - (x_tilde - s * eps)).abs().max() == 0


def test_ancestral_sigmas_split_the_target_noise():
    sigma_from, sigma_to = torch.tensor(14.6), torch.tensor([14.0, 3.0, 0.5, 0.0])
    sigma_down, sigma_up = ancestral_sigmas(sigma_from, sigma_to)
    assert torch.allclose(sigma_down**2 + sigma_up**2, sigma_to**2, rtol=1e-5, atol=1e-6)
    assert (sigma_down <= sigma_to).all() and (sigma_up >= 0).all()
    assert sigma_down[-1] == sigma_up[-1] == 0  # the last step adds no noise
    # k-diffusion's get_ancestral_step (eta = 1): sigma_up = sqrt(to^2 (from^2 - to^2) / from^2)
    assert torch.allclose(sigma_up, sigma_to * (1 - sigma_to**2 / sigma_from**2) ** 0.5)


@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_unknown_prediction_type(name):
    with pytest.raises(ArgumentError, match="prediction_type") as error:  # sdlab's own, a ValueError
        make_sampler(name, None, prediction_type="sample")
    assert all(kind in str(error.value) for kind in PREDICTION_TYPES)


def test_seed_names_still_import_from_ddpm():
    """The seed (and chapter 5) import the base class and the schedule from sdlab.ddpm."""
    from sdlab import ddpm, schedule

    assert ddpm.Sampler is schedule.Sampler and ddpm.make_betas is schedule.make_betas
    assert issubclass(DDPMSampler, schedule.Sampler)
    assert all(issubclass(kind, schedule.Sampler) for kind in SAMPLERS.values())
