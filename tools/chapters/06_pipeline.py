from nbtools import code, md, setup

CELLS = [
    md(r"""
    # 6. The pipeline

    All the parts are built. This chapter assembles them into text-to-image generation:
    **tokenize → encode → denoise with classifier-free guidance → decode**, first by hand and
    then with `sdlab.pipeline.generate`, and then takes the process apart: the guidance scale,
    image-to-image, inpainting, where each word of the prompt lands, and what the model believes the
    final image to be at every step.
    """),
    setup(),
    md(r"""
    ## Which model makes the pictures

    One code path serves both models. If the environment variable `SDLAB_CKPT` names the real
    SD1.5 checkpoint (or you set `DOWNLOAD = True` in Colab, which fetches it with
    `huggingface_hub`), the pictures are 512×512 images from Stable Diffusion 1.5. Otherwise they
    come from the **tiny Stable Diffusion** bundled with `sdlab`, trained in chapter 7 on 64×64
    pictures of coloured shapes: the same classes and the same code, with 1/1000 of the parameters.
    """),
    code(r"""
    import os
    from sdlab import model_loader, pipeline
    from sdlab.tokenizer import load_tokenizer

    DOWNLOAD = False  # in Colab: set to True to download the 4 GB SD1.5 checkpoint (needs network)
    ckpt = os.environ.get("SDLAB_CKPT")
    if DOWNLOAD and not ckpt:
        try:
            from huggingface_hub import hf_hub_download

            ckpt = hf_hub_download("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
        except Exception as error:  # offline, or no huggingface_hub: keep the tiny model
            print(f"could not download the checkpoint ({type(error).__name__}); using the tiny model")
    REAL = bool(ckpt) and os.path.exists(ckpt)
    if REAL or model_loader.DEFAULT_CHECKPOINT.exists():
        models = model_loader.preload_models_from_standard_weights(ckpt if REAL else None, "cpu")
        MODEL = "Stable Diffusion 1.5" if REAL else "the tiny sdlab model"
    else:  # an installation without the bundled weights: the same code on untrained tiny models
        from sdlab.train import TINY

        models = {name: m.eval().requires_grad_(False) for name, m in model_loader.build_models(TINY).items()}
        MODEL = "untrained tiny models (random weights: the bundled tiny model is not installed)"
    SIZE = 512 if REAL else 64
    STEPS = 25 if REAL else 20
    tokenizer = load_tokenizer()
    PROMPT = "a photograph of an astronaut riding a horse" if REAL else "a large red circle to the left of a small blue square"
    print(f"pictures in this chapter: {MODEL}, {SIZE}x{SIZE}, {STEPS} steps")
    print(model_loader.describe(models))
    """),
    md(r"""
    ## The four steps, by hand

    **1. Tokenize and encode** the prompt and the empty "negative" prompt (chapter 2):
    """),
    code(r"""
    clip, diffusion, decoder = models["clip"], models["diffusion"], models["decoder"]
    with torch.no_grad():
        context = pipeline.encode_prompts(tokenizer, clip, [PROMPT, ""], "cpu")
    print("context (prompt, empty prompt):", tuple(context.shape))
    """),
    md(r"""
    **2. Start from noise** in latent space, 1/8 of the image size, drawn from a seeded generator.

    **3. Denoise** with the U-Net (chapter 4) and a sampler (chapter 5). With *classifier-free
    guidance* the U-Net runs on a batch of two, with and without the prompt, and the guided noise
    prediction extrapolates from the unconditioned one towards the conditioned one:

    $$\hat\varepsilon = \varepsilon_\theta(z_t, t, \varnothing) + s\,\bigl(\varepsilon_\theta(z_t, t, c) - \varepsilon_\theta(z_t, t, \varnothing)\bigr)$$

    **4. Decode** the final latents with the VAE decoder (chapter 3).
    """),
    code(r"""
    from sdlab.diffusion import get_time_embedding
    from sdlab.samplers import make_sampler

    @torch.no_grad()
    def denoise(context, seed, cfg_scale=7.5, sampler_name="ddim", steps=STEPS, size=SIZE,
                init_latents=None, strength=1.0, mask=None, on_step=None):
        # The loop of pipeline.generate, written out; `mask` (1 = repaint) adds inpainting.
        generator = torch.Generator().manual_seed(seed)
        sampler = make_sampler(sampler_name, generator)
        sampler.set_inference_timesteps(steps)
        down = decoder.config.downscale
        shape = (1, decoder.config.latent_channels, size // down, size // down)
        noise = torch.randn(shape, generator=generator)
        if init_latents is not None and mask is None:  # image-to-image: start part-way
            sampler.set_strength(strength)
            latents = sampler.add_noise(init_latents, sampler.timesteps[:1], noise)
        else:
            latents = noise * sampler.init_noise_sigma
        for i, t in enumerate(sampler.timesteps):
            x = sampler.scale_model_input(latents, t).repeat(2, 1, 1, 1)
            cond, uncond = diffusion(x, context, get_time_embedding(t, diffusion.config.time_dim)).chunk(2)
            eps = uncond + cfg_scale * (cond - uncond)
            previous, latents = latents, sampler.step(t, latents, eps)
            if mask is not None:  # keep the known region: the original, noised to the next timestep
                later = sampler.timesteps[i + 1:i + 2]
                known = sampler.add_noise(init_latents, later, noise) if len(later) else init_latents
                latents = mask * latents + (1 - mask) * known
            if on_step is not None:
                on_step(i, t, previous, eps, sampler)
        return latents

    def decode(latents):
        with torch.no_grad():
            return pipeline.to_uint8(decoder(latents))[0]

    by_hand = decode(denoise(context, seed=1))
    plt.figure(figsize=(3, 3))
    plt.imshow(by_hand)
    plt.title(f"“{PROMPT}”\n{MODEL}", fontsize=8)
    plt.axis("off")
    plt.show()
    """),
    md(r"""
    **Check:** `pipeline.generate` is the same loop, so it must give the very same pixels. On the
    CPU it normally packs the weights for oneDNN first (chapter 8), which reorders the sums inside
    the convolutions and matrix products and can move a few pixels by one level; `packed=False` turns that
    off for this comparison:

    ```{literalinclude} ../sdlab/pipeline.py
    :pyobject: generate
    ```
    """),
    code(r"""
    generated = pipeline.generate(PROMPT, models=models, tokenizer=tokenizer, seed=1, sampler_name="ddim",
                                  n_inference_steps=STEPS, height=SIZE, width=SIZE, progress=False, packed=False)
    print("image", generated.shape, generated.dtype, "| identical to the loop by hand:", np.array_equal(generated, by_hand))
    """, check=True),
    md(r"""
    ## Classifier-free guidance

    The guidance scale $s$ trades diversity for fidelity to the prompt: $s = 1$ is the plain
    conditional model, $s = 0$ ignores the prompt, large $s$ exaggerates it until colours saturate.
    Same seed, increasing scale:
    """),
    code(r"""
    scales = [0.0, 1.0, 3.0, 7.5, 12.0]
    cfg_images = {s: decode(denoise(context, seed=2, cfg_scale=s)) for s in scales}
    fig, axes = plt.subplots(1, len(scales), figsize=(11, 2.6))
    for ax, s in zip(axes, scales):
        ax.imshow(cfg_images[s])
        ax.set_title(f"CFG scale {s:g}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"“{PROMPT}” ({MODEL})", fontsize=9)
    plt.show()
    """),
    md(r"""
    With a kernel, explore it live (the rendered book shows the controls with their first picture;
    the figure above is the static version):
    """),
    code(r"""
    import ipywidgets as widgets

    def show_small(image, title):  # the explorers' single picture
        fig, ax = plt.subplots(figsize=(2.4, 2.4), dpi=60)
        ax.imshow(image)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        plt.show()

    def cfg_explorer(cfg_scale=7.5, seed=2):
        show_small(decode(denoise(context, seed=seed, cfg_scale=cfg_scale)), f"scale {cfg_scale:g}, seed {seed}")

    widgets.interact(cfg_explorer,
                     cfg_scale=widgets.FloatSlider(value=7.5, min=0, max=15, step=0.5, continuous_update=False),
                     seed=widgets.IntSlider(value=2, min=0, max=20, continuous_update=False));
    """),
    md(r"""
    ## Image-to-image

    Instead of pure noise, start from an existing image: encode it (chapter 3), noise it to the
    timestep a fraction `strength` of the way up the schedule, and denoise from there with a new
    prompt. Low strength keeps the layout, high strength keeps little more than the colours.
    """),
    code(r"""
    from sdlab import shapes

    if REAL:
        from PIL import Image
        from skimage import data

        start_image = np.array(Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.Resampling.LANCZOS))
        NEW_PROMPT = "an oil painting of an astronaut, van gogh style"
    else:
        start_image = shapes.render(shapes.parse_caption("a large green triangle in the center"), SIZE)
        NEW_PROMPT = "a large purple square in the center"
    with torch.no_grad():
        start = torch.from_numpy(start_image).permute(2, 0, 1)[None].float() / 127.5 - 1
        down = decoder.config.downscale
        init_latents = models["encoder"](start, torch.zeros(1, 4, SIZE // down, SIZE // down))
        new_context = pipeline.encode_prompts(tokenizer, clip, [NEW_PROMPT, ""], "cpu")
    strengths = [0.2, 0.4, 0.6, 0.8, 1.0]
    img2img = {s: decode(denoise(new_context, seed=3, init_latents=init_latents, strength=s)) for s in strengths}
    fig, axes = plt.subplots(1, len(strengths) + 1, figsize=(12, 2.5))
    axes[0].imshow(start_image)
    axes[0].set_title("input", fontsize=9)
    for ax, s in zip(axes[1:], strengths):
        ax.imshow(img2img[s])
        ax.set_title(f"strength {s:g}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"“{NEW_PROMPT}” ({MODEL})", fontsize=9)
    plt.show()
    """),
    code(r"""
    def strength_explorer(strength=0.6):
        show_small(decode(denoise(new_context, seed=3, init_latents=init_latents, strength=strength)),
                   f"strength {strength:g}")

    widgets.interact(strength_explorer,
                     strength=widgets.FloatSlider(value=0.6, min=0.05, max=1.0, step=0.05, continuous_update=False));
    """),
    md(r"""
    ## Inpainting

    To repaint only part of an image with a model that was not trained for it, run the usual loop
    and, after every step, put back the *known* region: the original latents, noised to the next
    timestep. Only the masked region is generated, and it is generated to fit what surrounds it.
    (SD1.5 also has a dedicated inpainting U-Net with 9 input channels, `sdlab.config.SD15_INPAINTING`,
    which sees the mask; the loop below works with any model.)
    """),
    code(r"""
    latent_size = SIZE // decoder.config.downscale
    mask = torch.zeros(1, 1, latent_size, latent_size)
    mask[..., :, latent_size // 2:] = 1.0  # repaint the right half
    INPAINT_PROMPT = "a horse in a field" if REAL else "a small yellow circle to the right of a large green triangle"
    with torch.no_grad():
        inpaint_context = pipeline.encode_prompts(tokenizer, clip, [INPAINT_PROMPT, ""], "cpu")
    inpainted = [decode(denoise(inpaint_context, seed=s, init_latents=init_latents, mask=mask)) for s in (4, 5, 6)]
    pixel_mask = mask[0, 0].repeat_interleave(down, 0).repeat_interleave(down, 1).numpy()[..., None]
    fig, axes = plt.subplots(1, 5, figsize=(11, 2.5))
    axes[0].imshow(start_image)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow((start_image * (1 - 0.6 * pixel_mask)).astype(np.uint8))
    axes[1].set_title("mask (dark = repaint)", fontsize=9)
    for ax, image in zip(axes[2:], inpainted):
        ax.imshow(image)
        ax.set_title("inpainted", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"“{INPAINT_PROMPT}” ({MODEL})", fontsize=9)
    plt.show()
    """),
    md(r"""
    ## Where each word lands: cross-attention maps

    Every cross-attention layer of the U-Net gives, for every latent pixel, a distribution over
    the 77 tokens (chapter 1). Keeping those weights (`store_attention = True`), averaging them
    over heads, layers and steps and reading one token's column gives a map of where that word
    acts on the image.
    """),
    code(r"""
    import torch.nn.functional as F
    from sdlab.attention import CrossAttention

    crosses = [m for m in diffusion.modules() if isinstance(m, CrossAttention)]
    latent_hw = SIZE // decoder.config.downscale
    total = torch.zeros(77, latent_hw, latent_hw)

    def collect(module, inputs, output):
        weights = module.attention_weights[0].mean(0)  # conditional half, mean over heads: (pixels, 77)
        side = int(weights.shape[0] ** 0.5)
        maps = weights.T.reshape(77, 1, side, side)
        total.add_(F.interpolate(maps, size=(latent_hw, latent_hw), mode="bilinear")[:, 0])

    hooks = [m.register_forward_hook(collect) for m in crosses]
    for m in crosses:
        m.store_attention = True
    try:
        attention_image = decode(denoise(context, seed=1))
    finally:
        for m in crosses:
            m.store_attention = False
        for h in hooks:
            h.remove()

    words = tokenizer.tokenize(PROMPT)
    fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.5 * (len(words) + 1), 2.1))
    axes[0].imshow(attention_image)
    axes[0].set_title("image", fontsize=8)
    for j, word in enumerate(words, start=1):  # position 0 is <|startoftext|>
        heat = total[j] / total[j].max()
        axes[j].imshow(attention_image)
        axes[j].imshow(F.interpolate(heat[None, None], size=(SIZE, SIZE), mode="bilinear")[0, 0], cmap="jet", alpha=0.5)
        axes[j].set_title(word.replace("</w>", ""), fontsize=8)
    for ax in axes:
        ax.axis("off")
    plt.show()
    print(f"{len(crosses)} cross-attention layers, maps summed over {STEPS} steps")
    """),
    md(r"""
    ## What the model believes at each step

    At every step the noise prediction gives an estimate of the clean latents,
    $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\varepsilon) / \sqrt{\bar\alpha_t}$. Decoding it shows
    what the model currently "sees": the layout is decided in the first few steps, the details last.
    The animation is plain JavaScript and plays in the rendered book.
    """),
    code(r"""
    import re

    from matplotlib import animation
    from IPython.display import HTML

    predictions = []

    def record_x0(i, t, latents, eps, sampler):
        alpha_bar = sampler.alphas_cumprod[int(t)]
        predictions.append((int(t), decode((latents - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt())))

    final = decode(denoise(context, seed=1, on_step=record_x0))
    fig, ax = plt.subplots(figsize=(3, 3), dpi=60)
    frame = ax.imshow(predictions[0][1])
    title = ax.set_title("", fontsize=10)
    ax.axis("off")

    def show_step(k):
        frame.set_data(predictions[k][1])
        title.set_text(f"step {k + 1}/{len(predictions)}: x̂₀ at t = {predictions[k][0]}")
        return frame, title

    movie = animation.FuncAnimation(fig, show_step, frames=len(predictions), interval=300)
    plt.close(fig)
    player = movie.to_jshtml(default_mode="once")
    # matplotlib links its button icons from a CDN; the book ships Font Awesome itself (offline)
    HTML(re.sub(r'<link rel="stylesheet"\s+href="https://maxcdn[^"]*">', "", player))
    """),
    code(r"""
    picks = np.linspace(0, len(predictions) - 1, 6).round().astype(int)
    fig, axes = plt.subplots(1, 6, figsize=(11, 2.2))
    for ax, k in zip(axes, picks):
        ax.imshow(predictions[k][1])
        ax.set_title(f"x̂₀ at t = {predictions[k][0]}", fontsize=8)
        ax.axis("off")
    plt.show()
    """),
    md(r"""
    ## Summary

    * Text-to-image = tokenize → CLIP → a sampler loop over the U-Net with classifier-free guidance
      → VAE decoder; `pipeline.generate` is exactly that loop.
    * The guidance scale trades diversity for prompt fidelity; image-to-image starts the loop
      part-way from a noised encoding; inpainting re-imposes the known region after every step.
    * Cross-attention weights show where each token acts; $\hat x_0$ shows the image forming,
      coarse to fine.

    ## Exercises

    1. Use a negative prompt (`uncond_prompt=`) to remove a colour from the tiny model's pictures.
    2. Swap the sampler in `denoise` for `"euler_a"` and `"dpmpp_2m"`: how few steps are enough?
    3. Inpainting without re-noising the known region (paste `init_latents` directly) gives visible
       seams. Try it and explain why.
    4. Make a cross-attention map for the word *left* or *right*. Is it where you expect?
    """),
]
