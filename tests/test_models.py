"""The model registry: every architecture builds, runs on [0, 1] pixels and exposes φ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detector import MODELS, ImageClassifier, build_classifier, forward_features
from detector.models import build_network, import_factory

PHI_DIMS = {"wrn": 256, "resnet18": 512, "vgg11": 512, "densenet121": 1024, "cnn": 128}


def test_registry_names():
    assert set(MODELS) == set(PHI_DIMS)


@pytest.mark.parametrize("name", sorted(PHI_DIMS))
def test_each_model_builds_and_exposes_phi(name):
    torch.manual_seed(0)
    model = build_classifier(name, 10, 3, [0.5] * 3, [0.25] * 3).eval()
    logits, phi = forward_features(model, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert phi.shape == (2, PHI_DIMS[name])


def test_wrn_depth_and_width_are_configurable():
    net = build_network("wrn", 10, 3, {"depth": 16, "width": 2})
    blocks = [m for m in net.modules() if type(m).__name__ == "_PreActBlock"]
    assert len(blocks) == 3 * 2 and net.fc.in_features == 128
    default = build_network("wrn", 10, 3)  # WRN-28-4
    assert len([m for m in default.modules() if type(m).__name__ == "_PreActBlock"]) == 12
    assert default.fc.in_features == 256
    with pytest.raises(ValueError, match="6n\\+4"):
        build_network("wrn", 10, 3, {"depth": 27})


@pytest.mark.parametrize("name", ["cnn", "resnet18", "wrn"])
def test_single_channel_small_inputs(name):
    model = build_classifier(name, 10, 1).eval()
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_vgg_refuses_inputs_it_cannot_pool():
    with pytest.raises(ValueError, match="32×32"):
        build_classifier("vgg11", 10, 1)(torch.rand(1, 1, 8, 8))


def test_normalisation_lives_inside_the_model():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    model = ImageClassifier(net, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    x = torch.rand(4, 3, 1, 1)
    assert torch.allclose(model(x), net((x - 0.5) / 0.5))
    assert {"mean", "std"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="positive"):
        ImageClassifier(net, [0.0], [0.0])


def test_bring_your_own_factory():
    model = build_classifier("torchvision.models:resnet18", 10, 3, config={"num_classes": 10})
    assert forward_features(model.eval(), torch.rand(1, 3, 32, 32))[1].shape == (1, 512)
    with pytest.raises(ValueError, match="registered name"):
        import_factory("no_colon_here")
    with pytest.raises(ValueError, match="cannot import"):
        import_factory("not_a_module_xyz:thing")
    with pytest.raises(ValueError, match="no attribute"):
        import_factory("torchvision.models:not_a_model")


def test_a_factory_beside_the_working_directory_imports_from_any_command(tmp_path, monkeypatch):
    """Console scripts do not put the working directory on sys.path; the factory is found there all the same."""
    import importlib
    import sys

    (tmp_path / "factory_in_cwd.py").write_text("from torch import nn\n\ndef make(width=3):\n"
                                                "    return nn.Linear(2, width)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    (tmp_path / "optional_dependency_probe.py").write_text("raise SystemExit('imported from the working directory')\n")
    assert import_factory("factory_in_cwd:make")(width=5).out_features == 5
    # Only for that import: a later one (say, a server's optional dependency) does not look there.
    assert str(tmp_path) not in sys.path
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("optional_dependency_probe")
