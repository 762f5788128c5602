r"""TAESD: a tiny decoder for the VAE's latents, 1/18 of the VAE decoder's work.

Ollin Boer Bohan's *Tiny AutoEncoder for Stable Diffusion* (github.com/madebyollin/taesd) was
trained to map SD1.x latents to the same pixels as the VAE decoder, with none of its group norms
or attention: only 3x3 convolutions of 64 channels and ReLUs. Each residual block is

$$y = \operatorname{ReLU}\big(\operatorname{Conv}(\operatorname{ReLU}(\operatorname{Conv}(
\operatorname{ReLU}(\operatorname{Conv}(x))))) + x\big),$$

and the latents first pass a soft clamp, $z \to 3 \tanh(z / 3)$, so that an outlier cannot blow up
the ReLUs. At 512x512 that is 71 GMAC against the VAE decoder's 1,257 (counted in chapter 8): the
pixels are a little softer, and a 4-step LCM image on a CPU spends most of its time in the U-Net again.

`load_taesd(path)` reads the decoder from the files in use: taesd's own `taesd_decoder.safetensors`
/ `.pth` (layers named `1.weight`, `2.conv.0.weight`, ...; index 0 is the clamp), ComfyUI's full
`taesd.safetensors` (the same names under `taesd_decoder.`) and diffusers' `AutoencoderTiny`
(`decoder.layers.0.weight`, ...). It then stands in for the VAE decoder:
`generate(..., models={**models, "decoder": load_taesd(path)})`, or `--taesd FILE`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TAESDConfig
from .errors import CheckpointError

__all__ = ["TAESD_Decoder", "TinyResidualBlock", "load_taesd"]


class TinyResidualBlock(nn.Module):
    """Three 3x3 convolutions with ReLUs between them, plus the input, then a ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        self.skip = nn.Identity()  # a 1x1 convolution where the width changes; it never does here
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESD_Decoder(nn.Module):
    """`TAESD_Decoder()(latents)`: the U-Net's latents (B, 4, h, w) -> image (B, 3, 8h, 8w) in [-1, 1].

    It reads the latents as the U-Net leaves them (no 0.18215 to undo: TAESD was trained on them).
    """

    def __init__(self, config: TAESDConfig | None = None):
        super().__init__()
        self.config = config = config or TAESDConfig()
        width, last = config.width, len(config.blocks) - 1
        layers = [nn.Conv2d(config.latent_channels, width, 3, padding=1), nn.ReLU()]
        for level, n_blocks in enumerate(config.blocks):  # deepest resolution first
            layers += [TinyResidualBlock(width) for _ in range(n_blocks)]
            if level < last:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1, bias=False)]
            else:
                layers.append(nn.Conv2d(width, config.in_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)  # the indices of diffusers' DecoderTiny.layers

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        m = self.config.latent_magnitude
        x = torch.tanh(latents / m) * m  # the soft clamp
        x = self.layers(x)  # (B, 4, h, w) -> (B, 64, h, w) -> ... -> (B, 3, 8h, 8w) in about [0, 1]
        return x * 2 - 1


def decoder_names(names, source: str) -> dict[str, str]:
    """The file's tensor name -> `TAESD_Decoder`'s, for the decoder's tensors (two rules)."""
    renamed = {}
    for name in names:
        if name.startswith("decoder.layers."):  # diffusers' AutoencoderTiny: decoder.layers.N.* -> layers.N.*
            renamed[name] = name.removeprefix("decoder.")
        elif name.startswith(("encoder.", "taesd_encoder.")):
            continue  # a file of the whole autoencoder: its encoder is not needed
        else:  # taesd's own layout, N.* -> layers.{N-1}.* (its layer 0 is the clamp), maybe under taesd_decoder.
            index, dot, rest = name.removeprefix("taesd_decoder.").partition(".")
            if not (index.isdigit() and int(index) > 0 and dot):
                raise CheckpointError(f"{source}: tensor {name!r} is not a TAESD decoder's (expected taesd's "
                                      f"'1.weight', ... or diffusers' 'decoder.layers.0.weight', ...); pass "
                                      f"taesd_decoder.safetensors or an AutoencoderTiny file")
            renamed[name] = f"layers.{int(index) - 1}.{rest}"
    return renamed


def load_taesd(path, device="cpu", dtype=None) -> TAESD_Decoder:
    """Read a TAESD decoder file (see the module's docstring) -> `TAESD_Decoder` ready for inference.

    Names and shapes are checked from the file's header before any tensor is read; float16 weights
    become float32 on the CPU unless `dtype` says otherwise (as `preload_models_from_standard_weights`).
    """
    from .checkpoint_io import open_checkpoint, quoted
    from .model_loader import _checked, _read_dtype, check_device, check_dtype

    device, dtype = check_device(device), check_dtype(dtype)
    with torch.device("meta"):
        decoder = TAESD_Decoder()
    expected = {name: tuple(t.shape) for name, t in decoder.state_dict().items()}
    with open_checkpoint(path) as file:
        source = f"TAESD file {quoted(file.path)}"
        renamed = decoder_names(file.tensors, source)
        check_taesd_layout({ours: (theirs, file.tensors[theirs].shape) for theirs, ours in renamed.items()},
                           expected, source)
        state = {ours: _checked(file.read(theirs, _read_dtype(file.tensors[theirs].dtype, device, dtype)), theirs,
                                device, dtype, source) for theirs, ours in renamed.items()}
    decoder.load_state_dict(state, strict=True, assign=True)
    return decoder.eval().requires_grad_(False)


def check_taesd_layout(found: dict, expected: dict, source: str) -> None:
    """`found` (our name -> (the file's name, shape)) holds every tensor of `expected` (our name ->
    shape) with its shape, and nothing else; else a `CheckpointError` naming them as the file does."""
    from .model_loader import _some

    latent_channels = expected["layers.0.weight"][1]
    _, first = found.get("layers.0.weight", (None, None))
    if first is not None and len(first) == 4 and first[1] != latent_channels:
        raise CheckpointError(f"{source} decodes {first[1]}-channel latents (an SD3/FLUX TAESD has 16); SD1.x "
                              f"latents have {latent_channels}: use taesd_decoder.safetensors")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(found[name][0] for name in set(found) - set(expected))
    wrong = [f"{found[name][0]} {tuple(found[name][1])} (expected {expected[name]})"
             for name in sorted(set(found) & set(expected)) if tuple(found[name][1]) != expected[name]]
    for what, names in (("is missing", missing), ("has unexpected tensors", unexpected), ("has wrong shapes", wrong)):
        if names:
            raise CheckpointError(f"{source} {what}: {_some(names)}; pass taesd_decoder.safetensors (TAESD for "
                                  f"SD1.x) or diffusers' AutoencoderTiny file")
