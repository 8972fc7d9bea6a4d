import torch

from ebmad.models.ebm.network import EnergyNet
from ebmad.models.ebm.sgld import frozen, sgld_sample, uniform_init


def test_sgld_lowers_energy_of_quadratic():
    c = torch.full((1, 3, 8, 8), 0.3)

    def energy(x):
        return ((x - c) ** 2).flatten(1).sum(1)

    g = torch.Generator().manual_seed(0)
    x0 = uniform_init((16, 3, 8, 8), (-1, 1), "cpu", g)
    x = sgld_sample(energy, x0, steps=50, step_size=0.1, noise_std=0.01, generator=g)
    assert energy(x).mean() < 0.05 * energy(x0).mean()
    assert x.min() >= -1 and x.max() <= 1
    assert not x.requires_grad


def test_sgld_lowers_energy_of_network_without_touching_parameter_grads():
    torch.manual_seed(0)
    net = EnergyNet(3, 32)
    x0 = uniform_init((8, 3, 32, 32), (-1, 1), "cpu", torch.Generator().manual_seed(1))
    with frozen(net):
        x = sgld_sample(net, x0, steps=20, step_size=1.0, noise_std=0.01)
    with torch.no_grad():
        assert net(x).mean() < net(x0).mean()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())  # restored after sampling


def test_sgld_is_deterministic_given_generator():
    net = EnergyNet(1, 32)

    def run():
        g = torch.Generator().manual_seed(3)
        return sgld_sample(net, uniform_init((2, 1, 32, 32), (-1, 1), "cpu", g), 5, 1.0, 0.01, generator=g)

    assert torch.equal(run(), run())
