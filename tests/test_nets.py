import pytest
import torch

from ebmad.models.ebm.network import EnergyNet, stage_widths


def test_paper_parameter_count_and_layers_at_128():
    net = EnergyNet(in_channels=3, image_size=128)
    assert sum(p.numel() for p in net.parameters()) == 2_791_233
    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)]
    spec = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs]
    assert spec == [
        (3, 32, (3, 3), (1, 1), (1, 1)),
        (32, 64, (4, 4), (2, 2), (1, 1)),
        (64, 128, (4, 4), (2, 2), (1, 1)),
        (128, 256, (4, 4), (2, 2), (1, 1)),
        (256, 256, (4, 4), (2, 2), (1, 1)),
        (256, 256, (4, 4), (2, 2), (1, 1)),
        (256, 1, (4, 4), (1, 1), (0, 0)),
    ]
    # ELU between all layers, none after the last
    kinds = [type(m).__name__ for m in net.body]
    assert kinds == ["Conv2d", "ELU"] * 6 + ["Conv2d"]
    shapes, x = [], torch.zeros(2, 3, 128, 128)
    for m in net.body:
        x = m(x)
        if isinstance(m, torch.nn.Conv2d):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [
        (32, 128, 128),
        (64, 64, 64),
        (128, 32, 32),
        (256, 16, 16),
        (256, 8, 8),
        (256, 4, 4),
        (1, 1, 1),
    ]


def test_grayscale_parameter_count():
    # only the first conv changes: 2 * 32 * 9 fewer weights
    assert sum(p.numel() for p in EnergyNet(1, 128).parameters()) == 2_791_233 - 2 * 32 * 9


@pytest.mark.parametrize("size,stages", [(32, [64, 128, 256]), (64, [64, 128, 256, 256]),
                                         (256, [64, 128, 256, 256, 256, 256])])  # fmt: skip
def test_other_sizes_give_one_energy_per_image(size, stages):
    assert stage_widths(size) == stages
    net = EnergyNet(3, size)
    assert net(torch.randn(3, 3, size, size)).shape == (3,)


@pytest.mark.parametrize("size", [100, 4, 0])
def test_invalid_sizes_are_rejected(size):
    with pytest.raises(ValueError, match="image_size"):
        EnergyNet(3, size)
