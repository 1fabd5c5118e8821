"""PyTorch as an oracle (skipped where torch is absent; CI has none): one training step of a
model with batch norm, dropout(p=0) and Adam against torch, and an exported batch-norm model
giving our evaluation logits in torch.nn.Sequential in eval mode."""

from __future__ import annotations

import numpy as np
import pytest

from distcnn.export import torch_modules
from distcnn.layers import EVAL, Pass
from distcnn.model import Model
from distcnn.optim import make_optimizer

torch = pytest.importorskip("torch")
SPEC = "conv:4:3,bn,relu,maxpool:2,dropout:0,conv:6:3,bn,relu,gap,dense:8,bn,relu,dense"


def torch_net(model: Model):
    import collections

    scope = {"nn": torch.nn}  # the constructor strings export prints
    mods = [(n, eval(c, scope)) for n, c in torch_modules(model)]
    net = torch.nn.Sequential(collections.OrderedDict(mods)).double()
    state = {
        k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in model.param_views.items()
    }
    state.update({k: torch.from_numpy(np.array(v)) for k, v in model.buffers.items()})
    net.load_state_dict(state)
    return net


def test_one_training_step_with_bn_dropout0_adam_matches_torch():
    rng = np.random.default_rng(0)
    model = Model(SPEC, (2, 8, 8), 5, np.float64)
    model.init_params(1)
    net = torch_net(model)
    x = rng.standard_normal((6, 2, 8, 8))
    labels = rng.integers(0, 5, size=6)
    opt = make_optimizer("adam", model.params, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8)
    topt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.01)  # fmt: skip
    for step in range(2):
        loss, _ = model.loss_and_grad(x, labels, scale=1 / 6, ctx=Pass(True, 0, step))
        model.update_running_stats()
        opt.step(model.grads, 0.01)
        net.train()
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)),
                                                  torch.from_numpy(labels))  # fmt: skip
        tloss.backward()
        topt.step()
        assert loss / 6 == pytest.approx(tloss.item(), rel=1e-9)
    theirs = dict(net.named_parameters())
    for name, view in model.param_views.items():
        t = theirs[name].detach().numpy()
        if name in ("conv1.bias", "conv2.bias", "fc1.bias"):
            # right before a bn: a zero gradient, so Adam moves it by rounding noise only
            assert np.abs(view).max() < 1e-5 and np.abs(t).max() < 1e-5, name
            continue
        np.testing.assert_allclose(view, t, rtol=1e-7, atol=1e-9, err_msg=name)
    tb = dict(net.named_buffers())
    for name, a in model.buffers.items():
        np.testing.assert_allclose(a, tb[name].numpy(), rtol=1e-7, atol=1e-10, err_msg=name)


def test_exported_bn_model_gives_our_eval_logits_in_torch(tmp_path):
    from distcnn import export

    rng = np.random.default_rng(1)
    model = Model(SPEC, (2, 8, 8), 5, np.float32)
    model.init_params(2)
    for step in range(3):  # move the running statistics away from 0 and 1
        x = (1 + 2 * rng.standard_normal((8, 2, 8, 8))).astype(np.float32)
        model.loss_and_grad(x, rng.integers(0, 5, size=8), ctx=Pass(True, 0, step))
        model.update_running_stats()
    out = export.export_npz({**model.param_views, **model.buffers}, tmp_path / "m.npz")
    scope: dict = {}
    exec(export.torch_code(model, str(out)), scope)  # the snippet export --torch prints
    x = (1 + 2 * rng.standard_normal((4, 2, 8, 8))).astype(np.float32)
    with torch.no_grad():
        theirs = scope["net"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, model.forward(x, EVAL), rtol=1e-4, atol=1e-5)
    assert int(np.load(out)["bn1.num_batches_tracked"]) == 3
