"""The ``lama`` engine: learned object removal with LaMa (big-lama), from a local weights file.

LaMa (Suvorov et al., "Resolution-robust Large Mask Inpainting with Fourier Convolutions",
WACV 2022) is a feed-forward network: one pass, no prompt, no steps, and it removes objects
far better than any copy-based fill where the hole hides something unique. Its generator is
written out here in plain torch (``FFCResNetGenerator`` with the big-lama configuration:
fast Fourier convolutions in 18 residual blocks), with the module names of the authors'
code, so the generator's weights from their ``best.ckpt`` load as they are.

Weights are never downloaded. ``load_generator`` reads a state dict from a ``.safetensors``,
``.pt``/``.pth`` or Lightning ``.ckpt`` file (keys with or without the ``generator.`` prefix;
the discriminator's and the losses' are ignored) and infers the sizes (base width, number of
blocks) from it, so a small model of the same architecture loads through the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from genfill.protocol import ErrorCode, Mode

from .base import DeviceKind, EngineCapabilities, EngineDefaults, EngineError, EngineJob, StepCallback

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")
"""File types ``load_generator`` reads."""

WEIGHT_NAMES = ("big-lama", "big_lama", "lama")
"""``find_weights`` takes a file whose name (without suffix) starts with one of these."""

SIDE_MULTIPLE = 8
"""The generator halves three times: inputs are padded to a multiple of 8 a side ..."""

MIN_SIDE = 16
"""... and to at least this many pixels."""


@dataclass(frozen=True)
class LamaConfig:
    """Sizes of an ``FFCResNetGenerator``; the defaults are big-lama's."""

    base_channels: int = 64
    blocks: int = 18
    downsamplings: int = 3
    max_channels: int = 1024
    global_ratio: float = 0.75


BIG_LAMA = LamaConfig()


def build_generator(config: LamaConfig = BIG_LAMA):
    """Returns an untrained LaMa generator (``torch.nn.Module``) of ``config``'s sizes."""
    import torch
    from torch import nn

    class FourierUnit(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.conv_layer = nn.Conv2d(channels * 2, channels * 2, kernel_size=1, bias=False)
            self.bn = nn.BatchNorm2d(channels * 2)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            batch = x.shape[0]
            spectrum = torch.fft.rfftn(x, dim=(-2, -1), norm="ortho")
            spectrum = torch.stack((spectrum.real, spectrum.imag), dim=-1).permute(0, 1, 4, 2, 3).contiguous()
            spectrum = spectrum.view((batch, -1) + spectrum.shape[3:])
            spectrum = self.relu(self.bn(self.conv_layer(spectrum)))
            spectrum = spectrum.view((batch, -1, 2) + spectrum.shape[2:]).permute(0, 1, 3, 4, 2).contiguous()
            spectrum = torch.complex(spectrum[..., 0], spectrum[..., 1])
            return torch.fft.irfftn(spectrum, s=x.shape[-2:], dim=(-2, -1), norm="ortho")

    class SpectralTransform(nn.Module):
        def __init__(self, in_channels: int, out_channels: int, stride: int):
            super().__init__()
            self.downsample = nn.AvgPool2d(kernel_size=2, stride=2) if stride == 2 else nn.Identity()
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, out_channels // 2, kernel_size=1, bias=False),
                nn.BatchNorm2d(out_channels // 2),
                nn.ReLU(inplace=True),
            )
            self.fu = FourierUnit(out_channels // 2)
            self.conv2 = nn.Conv2d(out_channels // 2, out_channels, kernel_size=1, bias=False)

        def forward(self, x):
            x = self.conv1(self.downsample(x))
            return self.conv2(x + self.fu(x))

    class FFC(nn.Module):
        """A convolution split into a local and a global (spectral) part."""

        def __init__(self, in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride=1, padding=0, dilation=1):
            super().__init__()
            in_cg = int(in_channels * ratio_gin)
            in_cl = in_channels - in_cg
            out_cg = int(out_channels * ratio_gout)
            out_cl = out_channels - out_cg
            self.ratio_gout = ratio_gout

            def conv(cin, cout):
                if cin == 0 or cout == 0:
                    return nn.Identity()
                return nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, bias=False, padding_mode="reflect")

            self.convl2l = conv(in_cl, out_cl)
            self.convl2g = conv(in_cl, out_cg)
            self.convg2l = conv(in_cg, out_cl)
            self.convg2g = nn.Identity() if in_cg == 0 or out_cg == 0 else SpectralTransform(in_cg, out_cg, stride)

        def forward(self, x):
            x_l, x_g = x if isinstance(x, tuple) else (x, 0)
            out_l, out_g = 0, 0
            if self.ratio_gout != 1:
                out_l = self.convl2l(x_l) + self.convg2l(x_g)
            if self.ratio_gout != 0:
                out_g = self.convl2g(x_l) + self.convg2g(x_g)
            return out_l, out_g

    class FFCNormAct(nn.Module):
        def __init__(self, in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride=1, padding=0, dilation=1):
            super().__init__()
            self.ffc = FFC(in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride, padding, dilation)
            global_channels = int(out_channels * ratio_gout)
            self.bn_l = nn.Identity() if ratio_gout == 1 else nn.BatchNorm2d(out_channels - global_channels)
            self.bn_g = nn.Identity() if ratio_gout == 0 else nn.BatchNorm2d(global_channels)
            self.act_l = nn.Identity() if ratio_gout == 1 else nn.ReLU(inplace=True)
            self.act_g = nn.Identity() if ratio_gout == 0 else nn.ReLU(inplace=True)

        def forward(self, x):
            x_l, x_g = self.ffc(x)
            return self.act_l(self.bn_l(x_l)), self.act_g(self.bn_g(x_g))

    class FFCResnetBlock(nn.Module):
        def __init__(self, channels: int, ratio: float):
            super().__init__()
            self.conv1 = FFCNormAct(channels, channels, 3, ratio, ratio, padding=1)
            self.conv2 = FFCNormAct(channels, channels, 3, ratio, ratio, padding=1)

        def forward(self, x):
            x_l, x_g = x
            y_l, y_g = self.conv2(self.conv1((x_l, x_g)))
            return x_l + y_l, x_g + y_g

    class ConcatTupleLayer(nn.Module):
        def forward(self, x):
            x_l, x_g = x
            return torch.cat(x, dim=1) if torch.is_tensor(x_g) else x_l

    c = config
    width = c.base_channels
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), FFCNormAct(4, width, 7, 0, 0)]
    for index in range(c.downsamplings):
        cin = min(c.max_channels, width * 2**index)
        cout = min(c.max_channels, width * 2 ** (index + 1))
        ratio_out = c.global_ratio if index == c.downsamplings - 1 else 0
        layers.append(FFCNormAct(cin, cout, 3, 0, ratio_out, stride=2, padding=1))
    bottleneck = min(c.max_channels, width * 2**c.downsamplings)
    layers += [FFCResnetBlock(bottleneck, c.global_ratio) for _ in range(c.blocks)]
    layers.append(ConcatTupleLayer())
    for index in range(c.downsamplings):
        cin = min(c.max_channels, width * 2 ** (c.downsamplings - index))
        cout = min(c.max_channels, width * 2 ** (c.downsamplings - index) // 2)
        layers += [
            nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(True),
        ]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, 3, kernel_size=7), nn.Sigmoid()]

    class FFCResNetGenerator(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(*layers)

        def forward(self, x):
            return self.model(x)

    return FFCResNetGenerator()


def read_state_dict(path: Path) -> dict:
    """The generator's tensors in ``path``, keyed as in ``build_generator``'s module.

    Raises:
        ValueError: the file type is not one of ``WEIGHT_SUFFIXES``, or it holds no LaMa
            generator.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path.name}: LaMa weights must be one of {', '.join(WEIGHT_SUFFIXES)}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors: Mapping = load_file(str(path))
    else:
        import torch

        # weights_only: a checkpoint is data, never code to run (a .ckpt is a pickle).
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        tensors = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    generator = {}
    for key, value in tensors.items():
        if key.startswith("generator."):
            key = key[len("generator.") :]
        elif "." in key and not key.startswith("model."):
            continue  # the discriminator, the losses' networks
        generator[key] = value
    if "model.1.ffc.convl2l.weight" not in generator:
        raise ValueError(f"{path.name}: no LaMa generator in this file (no model.1.ffc.convl2l.weight)")
    return generator


def config_of(state: Mapping) -> LamaConfig:
    """The sizes of the generator whose tensors are ``state``."""
    base = int(state["model.1.ffc.convl2l.weight"].shape[0])
    blocks = {int(key.split(".")[1]) for key in state if key.split(".")[2:3] == ["conv1"]}
    downsamplings = sum(1 for index in range(2, 2 + 8) if f"model.{index}.ffc.convl2l.weight" in state)
    global_out = state.get(f"model.{1 + downsamplings}.ffc.convl2g.weight")
    bottleneck = int(state[f"model.{1 + downsamplings}.ffc.convl2l.weight"].shape[0])
    ratio = 0.75 if global_out is None else int(global_out.shape[0]) / (int(global_out.shape[0]) + bottleneck)
    return LamaConfig(base_channels=base, blocks=len(blocks), downsamplings=downsamplings, global_ratio=round(ratio, 4))


def load_generator(path: str | Path, device: str = "cpu"):
    """Builds the generator that ``path`` holds and loads its weights (strictly: every
    tensor must fit), in eval mode on ``device``."""
    state = read_state_dict(Path(path))
    generator = build_generator(config_of(state))
    generator.load_state_dict(state, strict=True)
    return generator.eval().to(device)


def find_weights(folders: list[str | Path]) -> Path | None:
    """The first LaMa weights file directly in one of ``folders`` (by name, see
    ``WEIGHT_NAMES``), or ``None``. Nothing is downloaded: get big-lama from the LaMa
    authors' release (``big-lama.zip``, its ``models/best.ckpt``) and put it in a models
    folder as ``big-lama.ckpt``."""
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            stem = path.stem.lower()
            if path.suffix.lower() in WEIGHT_SUFFIXES and any(stem.startswith(name) for name in WEIGHT_NAMES):
                return path
    return None


def inpaint(generator, image: np.ndarray, hole: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Runs ``generator`` once: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` bool hole in,
    ``(H, W, 3)`` uint8 out, equal to ``image`` outside the hole."""
    import torch

    height, width = hole.shape
    # The bottleneck's reflection padding needs at least 2 pixels there: 16 px at the input.
    padded_height = max(MIN_SIDE, height + -height % SIDE_MULTIPLE)
    padded_width = max(MIN_SIDE, width + -width % SIDE_MULTIPLE)
    pad = ((0, padded_height - height), (0, padded_width - width))
    # Reflect needs a side longer than the pad; edge replication works for any size.
    mode = "reflect" if height > pad[0][1] and width > pad[1][1] else "edge"
    padded_image = np.pad(image, pad + ((0, 0),), mode=mode).astype(np.float32) / 255
    padded_hole = np.pad(hole, pad, mode=mode).astype(np.float32)
    with torch.inference_mode():
        rgb = torch.from_numpy(padded_image).permute(2, 0, 1)[None].to(device)
        mask = torch.from_numpy(padded_hole)[None, None].to(device)
        # LaMa's input: the image with the hole blanked, and the mask (its training layout).
        output = generator(torch.cat([rgb * (1 - mask), mask], dim=1))
        output = output[0].permute(1, 2, 0).float().cpu().numpy()[:height, :width]
    result = image.copy()
    result[hole] = np.clip(np.rint(output[hole] * 255), 0, 255).astype(np.uint8)
    return result


class LamaEngine:
    """The ``Engine`` for learned removal; one pass, so every seed gives the same image."""

    name = "lama"
    # LaMa was trained at 256 px and holds up to about 2k; 512 keeps a CPU pass near a second.
    capabilities = EngineCapabilities(
        modes=frozenset({Mode.REMOVE, Mode.FILL}), prompt=False, native_size=512, device_kind=DeviceKind.GPU
    )
    defaults = EngineDefaults()

    def __init__(self, weights: str | Path, device: str = "cpu") -> None:
        self.weights = Path(weights)
        self.device = device
        self._generator = None

    def load(self) -> None:
        """Loads the weights file.

        Raises:
            EngineError: ``engine_unavailable`` when torch is missing or the file is
                unreadable or not a LaMa generator (the message names the file, not the
                error's internals).
        """
        try:
            self._generator = load_generator(self.weights, self.device)
        except ImportError as exc:
            raise EngineError(ErrorCode.ENGINE_UNAVAILABLE, "the lama engine needs torch (the 'diffusion' extra)") from exc
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise EngineError(
                ErrorCode.ENGINE_UNAVAILABLE, f"the LaMa weights in {self.weights.name} could not be loaded"
            ) from exc

    def close(self) -> None:
        self._generator = None

    def run(self, job: EngineJob, on_step: StepCallback) -> list[np.ndarray]:
        """Returns one ``(H, W, 3)`` uint8 image per seed (all equal: LaMa is deterministic).

        The hole is every pixel with a non-zero ``job.selection``, as for the classic engine.

        Raises:
            EngineError: ``empty_selection`` when the selection is all zero.
        """
        hole = np.asarray(job.selection) > 0
        if not hole.any():
            raise EngineError(ErrorCode.EMPTY_SELECTION, "the selection is empty: there is nothing to fill")
        if self._generator is None:
            self.load()
        on_step(0, 1, None)
        filled = inpaint(self._generator, np.ascontiguousarray(job.image[..., :3]), hole, self.device)
        on_step(1, 1, None)
        return [filled.copy() for _ in job.seeds]
