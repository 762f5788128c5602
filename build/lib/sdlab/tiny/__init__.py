"""The tiny Stable Diffusion of `sdlab/data/tiny.safetensors`: its data, its training, its evaluation.

The model itself is SD1.5's classes at the `config.TINY` sizes; this subpackage holds what only the
tiny model needs:

- `data`: the Shapes dataset, procedural captioned pictures of coloured shapes, with held-out
  attribute combinations;
- `analyzer`: reads a Shapes picture back into attributes and scores it against its prompt;
- `train`: the two-stage training (VAE, then text encoder + U-Net), resumable (`python -m sdlab train`);
- `evaluate`: batched generation and prompt-following figures (`python -m sdlab evaluate`);
- `cli`: the two commands' options.
"""
