"""The EBM scorer as a plain forward network, for ONNX export: the input gradient written out by hand.

The anomaly map needs g(x) = -dE/dx, which an ONNX graph cannot get from autograd. :class:`EBMScorer`
runs the energy network once keeping every pre-activation z_l, then the backward pass explicitly:

    dE/dh_L = conv_transpose(1, W_L)                                  (final 4x4/s1/p0 conv)
    dE/dz_l = dE/dh_l * ELU'(z_l),  ELU'(z) = 1 if z > 0 else exp(z) (= exp(min(z, 0)))
    dE/dh_{l-1} = conv_transpose(dE/dz_l, W_l, stride, padding, output_padding)

with the same weights as the forward convs (biases drop out). Standardization, the L2-over-channels
map and the image score are those of :mod:`ebmad.models.ebm.scoring` (``a_std_l2`` / ``A_std_l2`` by
default; also ``a_ms`` / ``A_ms_max`` / ``energy``), with the model's input normalization and fixed
scoring noise when it has them. Spectrally normalized weights are exported as plain weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ebmad.models.ebm.network import EnergyNet
from ebmad.models.ebm.scoring import instance_normalize, multiscale_map, pnorm, standardize

EXPORTABLE_MAPS = ("a_std_l2", "a_ms")
EXPORTABLE_SCORES = ("A_std_l2", "A_ms_max", "energy")


@torch.no_grad()
def plain_conv(m: nn.Conv2d) -> nn.Conv2d:
    """A parameter copy of a conv; a spectrally normalized weight is read (no power iteration) and stored plain."""
    was_training = m.training
    m.eval()
    out = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                    bias=m.bias is not None).to(m.weight)  # fmt: skip
    out.weight.copy_(m.weight)
    if m.bias is not None:
        out.bias.copy_(m.bias)
    m.train(was_training)
    return out.train(was_training)


class EBMScorer(nn.Module):
    """x (B, C, S, S) in [-1, 1] -> (pixel map (B, S, S), image score (B,), energy (B,)).

    The map and score are ``DEFAULT_PIXEL_MAP`` (a_std_l2) and ``DEFAULT_IMAGE_SCORE`` (A_std_l2).
    """

    output_names = ("pixel_map", "image_score", "energy")  # the ONNX output names

    def __init__(
        self,
        net: EnergyNet,
        grad_mean: torch.Tensor,
        grad_std: torch.Tensor,
        eps: float = 1e-6,
        input_norm: str = "none",
        noise: torch.Tensor | None = None,
        pixel_map: str = "a_std_l2",
        image_score: str = "A_std_l2",
        map_sigmas: list[float] | None = None,
    ) -> None:
        super().__init__()
        if pixel_map not in EXPORTABLE_MAPS or image_score not in EXPORTABLE_SCORES:
            raise ValueError(
                f"ONNX export supports the pixel maps {EXPORTABLE_MAPS} and image scores {EXPORTABLE_SCORES}; "
                f"this model's defaults are {pixel_map!r} / {image_score!r} (model.default_pixel_map / "
                "model.default_image_score)"
            )
        if (pixel_map == "a_ms" or image_score == "A_ms_max") and not map_sigmas:
            raise ValueError("the multi-scale map needs model.map_sigmas")
        self.input_norm = input_norm
        self.pixel_map, self.image_score = pixel_map, image_score
        self.map_sigmas = tuple(float(v) for v in map_sigmas) if map_sigmas else ()
        self.register_buffer("noise", None if noise is None else noise.detach().clone())
        layers = list(net.body)
        convs = [plain_conv(m) if isinstance(m, nn.Conv2d) else m for m in layers[0::2]]
        if not (
            all(isinstance(m, nn.Conv2d) for m in convs)
            and all(isinstance(m, nn.ELU) and m.alpha == 1.0 for m in layers[1::2])
            and len(convs) == len(layers) // 2 + 1
        ):
            raise ValueError("EBMScorer expects the EnergyNet layout conv, ELU, conv, ..., ELU, conv")
        self.convs = nn.ModuleList(convs)  # copies: moving the scorer leaves the model alone
        self.register_buffer("grad_mean", grad_mean.detach().clone())
        self.register_buffer("grad_std", grad_std.detach().clone())
        self.eps = eps
        # output_padding of each transposed conv, so that it restores the forward conv's input size
        size = net.image_size
        self.output_padding: list[int] = []
        for conv in convs:
            (k,), (s,), (p,) = conv.kernel_size[:1], conv.stride[:1], conv.padding[:1]
            out = (size + 2 * p - k) // s + 1
            self.output_padding.append(size - ((out - 1) * s - 2 * p + k))
            size = out
        if size != 1:
            raise ValueError(f"the energy network must end in a 1x1 map, got {size}x{size}")

    def energy_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E(x) (B,), g(x) = -dE/dx (B, C, S, S)) without autograd."""
        pre: list[torch.Tensor] = []
        h = x
        for conv in self.convs[:-1]:
            z = conv(h)
            pre.append(z)
            h = F.elu(z)
        last = self.convs[-1]
        energy = last(h).flatten(1).squeeze(1)
        grad = F.conv_transpose2d(
            torch.ones_like(energy).view(-1, 1, 1, 1), last.weight, stride=last.stride, padding=last.padding,
            output_padding=self.output_padding[-1],
        )  # fmt: skip
        for i in range(len(pre) - 1, -1, -1):
            conv = self.convs[i]
            grad = grad * torch.exp(pre[i].clamp(max=0.0))  # ELU'(z)
            grad = F.conv_transpose2d(grad, conv.weight, stride=conv.stride, padding=conv.padding,
                                      output_padding=self.output_padding[i])  # fmt: skip
        return energy, -grad

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if self.noise is not None:
            x = (x.unsqueeze(1) + self.noise.unsqueeze(0)).flatten(0, 1)
        if self.input_norm == "instance":
            x = instance_normalize(x)
        energy, g = self.energy_and_grad(x)
        if self.noise is not None:
            n = self.noise.shape[0]
            energy = energy.reshape(b, n).mean(1)
            g = g.reshape(b, n, *g.shape[1:]).mean(1)
        a = pnorm(standardize(g, self.grad_mean, self.grad_std, self.eps), 2, dims=(1,))  # eq. 2
        maps = {"a_std_l2": a}
        if self.map_sigmas:
            maps["a_ms"] = multiscale_map(a, self.map_sigmas)
        scores = {"energy": energy, "A_std_l2": pnorm(a, 2, dims=(1, 2))}  # eq. 3
        if self.map_sigmas:
            scores["A_ms_max"] = maps["a_ms"].amax(dim=(1, 2))
        return maps[self.pixel_map], scores[self.image_score], energy
