"""torch.compile(fullgraph=True): no graph breaks, same numbers as eager, in training and eval."""

import pytest
import torch

import batchnorm


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_training_and_eval(momentum):
    torch._dynamo.reset()
    eager = batchnorm.BatchNorm2d(3, momentum=momentum)
    compiled_module = batchnorm.BatchNorm2d(3, momentum=momentum)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) + step
        xe = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        torch.testing.assert_close(yc, ye)
        (ye**2).sum().backward()
        (yc**2).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[key], value)
    eager.eval()
    compiled_module.eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(compiled(x), eager(x))


def test_compiled_with_inductor():
    torch._dynamo.reset()
    module = batchnorm.BatchNorm1d(4)
    reference = batchnorm.BatchNorm1d(4)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(8, 4)
    torch.testing.assert_close(compiled(x), reference(x))
    torch.testing.assert_close(module.running_var, reference.running_var)
