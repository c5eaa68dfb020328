"""The per-face switch to a fallback conditioning net (``ConditioningNet(fallback=...)``,
``bpd_sr.training.switchfit``, ``bpd-sr fit-switch``): faces below the threshold get the
fallback's output and no other face changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bpd_sr.cli import main
from bpd_sr.config import ModelConfig
from bpd_sr.io.pretrained import load_checkpoint, load_pretrained, save_checkpoint
from bpd_sr.model.conditioning import ConditioningNet, departure_from_bicubic
from bpd_sr.model.mixture import set_flip_average
from bpd_sr.model.transformer import ImageTransformer
from bpd_sr.training.switchfit import SwitchFitError, attach_fallback, departures


def _gaussian_net(seed: int, **kwargs) -> ConditioningNet:
    """A gaussian-head net whose output layer is not zero (a new one is the input pixel)."""
    torch.manual_seed(seed)
    net = ConditioningNet(8, 1, head="gaussian", **kwargs).double()
    with torch.no_grad():
        net.out.weight.normal_(0, 0.05)
        net.out.bias.normal_(0, 0.3)
    return net.eval()


def _switched(threshold: float, flip_average: bool = False) -> tuple[ConditioningNet, ...]:
    own, fallback = _gaussian_net(0), _gaussian_net(1)
    own.flip_average = fallback.flip_average = flip_average
    twin = ConditioningNet(8, 1, head="gaussian").double()
    twin.load_state_dict(fallback.state_dict())
    switched = ConditioningNet(8, 1, head="gaussian", fallback=twin, switch_departure=threshold,
                               flip_average=flip_average).double()
    switched.load_state_dict(own.state_dict(), strict=False)
    return own, fallback, switched.eval()


@pytest.mark.parametrize("flip_average", [False, True])
def test_each_face_gets_the_fallback_exactly_when_its_departure_is_below_the_threshold(flip_average):
    lr = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    own, fallback, _ = _switched(0.0, flip_average)
    with torch.no_grad():
        d = own.departure(lr)
        # a threshold between the third and fourth smallest departures hands over three faces
        threshold = float(d.sort().values[2:4].mean())
        _, _, switched = _switched(threshold, flip_average)
        assert switched.flip_average == flip_average and switched.fallback.flip_average == flip_average
        doubt = d < threshold
        assert int(doubt.sum()) == 3
        expected = torch.where(doubt[:, None, None], fallback(lr), own(lr))
        assert torch.equal(switched(lr), expected)
        # a prefix decode reads the same logits for the positions it asks for
        assert torch.equal(switched(lr, 100), expected[:, :100])
        # and the switch is per face: a face alone gets what it got in the batch
        for i in range(len(lr)):
            assert torch.equal(switched(lr[i:i + 1]), expected[i:i + 1])


def test_the_departure_is_the_mean_step_away_from_bicubic_in_sigmas():
    own = _gaussian_net(0)
    lr = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        mu, sigma = own.gaussian_parameters(lr)
    x = lr.permute(0, 3, 1, 2).double()
    bicubic = torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic").clamp(0, 255)
    expected = ((mu - bicubic).abs() / sigma).mean((1, 2, 3))
    assert torch.allclose(own.departure(lr).double(), expected, rtol=1e-5)
    # a net that writes bicubic itself departs by nothing
    assert torch.allclose(departure_from_bicubic(x, bicubic, torch.ones_like(bicubic)),
                          torch.zeros(2, dtype=torch.float32), atol=1e-5)


def _tiny(seed: int) -> ImageTransformer:
    torch.manual_seed(seed)
    model = ImageTransformer(ModelConfig.preset("tiny", cond_head="gaussian"))
    with torch.no_grad():
        model.cond.out.weight.normal_(0, 0.05)
        model.cond.out.bias.normal_(0, 0.3)
    return model.eval()


def test_attach_fallback_sets_the_held_out_quantile_and_the_checkpoint_keeps_the_switch(tmp_path):
    model, other = _tiny(0), _tiny(1)
    held_out = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    own = departures(model.cond, held_out)
    threshold = attach_fallback(model, other.cond, held_out, 0.25)
    assert threshold == pytest.approx(float(torch.quantile(own.double(), 0.25)))
    assert model.cfg.cond_fallback and model.cfg.cond_switch_departure == threshold
    handed = own < threshold
    assert int(handed.sum()) == 10  # a quarter of the 40 faces
    # the model's own net is unchanged and its own departure is still read without the fallback
    assert torch.equal(departures(model.cond, held_out), own)
    lr = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        before = model.cond(lr)
        loaded = load_pretrained(save_checkpoint(tmp_path / "s.pt", model))
        assert loaded.cfg.cond_fallback and loaded.cfg.cond_switch_departure == threshold
        assert torch.equal(loaded.cond(lr), before)
    # the mirror average is one setting for both nets
    set_flip_average(loaded, True)
    assert loaded.cond.fallback.flip_average


def test_attach_fallback_refuses_nets_it_cannot_switch():
    held_out = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    model = _tiny(0)
    with pytest.raises(SwitchFitError, match="shape"):
        attach_fallback(model, ConditioningNet(16, 1, head="gaussian"), held_out, 0.1)
    with pytest.raises(SwitchFitError, match="between 0 and 1"):
        attach_fallback(model, _tiny(1).cond, held_out, 1.0)
    logits = ImageTransformer(ModelConfig.preset("tiny", cond_head="logits"))
    with pytest.raises(SwitchFitError, match="gaussian head"):
        attach_fallback(logits, _tiny(1).cond, held_out, 0.1)
    attach_fallback(model, _tiny(1).cond, held_out, 0.1)
    with pytest.raises(SwitchFitError, match="has a fallback of its own"):
        attach_fallback(_tiny(2), model.cond, held_out, 0.1)
    # switching a switched model again replaces its fallback (the shipped weights have one)
    attach_fallback(model, _tiny(2).cond, held_out, 0.2)
    assert torch.equal(model.cond.fallback.out.weight, _tiny(2).cond.out.weight)
    with pytest.raises(ValueError, match="gaussian head"):
        ConditioningNet(8, 1, head="logits", fallback=ConditioningNet(8, 1, head="gaussian"))


def test_fit_switch_command_writes_a_switched_model_and_checks_its_inputs(tmp_path):
    save_checkpoint(tmp_path / "own.pt", _tiny(0), extra={"about": {"note": "the own net"}})
    save_checkpoint(tmp_path / "hedge.pt", _tiny(1))
    faces = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "faces.npz", images=faces)
    args = ["fit-switch", "--checkpoint", tmp_path / "own.pt", "--fallback",
            tmp_path / "hedge.pt", "--data", tmp_path / "faces.npz", "--n-val", "20",
            "--quantile", "0.1", "--out", tmp_path / "switched.pt", "-q"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    model = load_pretrained(tmp_path / "switched.pt")
    assert model.cfg.cond_fallback
    # the threshold is measured on the bf16-rounded nets, i.e. on the file written
    own = departures(model.cond, torch.as_tensor(faces[-20:]))
    assert model.cfg.cond_switch_departure == pytest.approx(float(torch.quantile(own.double(), 0.1)))
    assert "the 0.1 quantile of 20 faces" in res.output
    about = load_checkpoint(tmp_path / "switched.pt")["about"]
    assert about["note"] == "the own net" and about["switch_fit"]["quantile"] == 0.1
    # a switched model as --fallback gives its own fallback: the threshold set again
    again = [str(a) for a in args]
    again[again.index(str(tmp_path / "own.pt"))] = str(tmp_path / "switched.pt")
    again[again.index(str(tmp_path / "hedge.pt"))] = str(tmp_path / "switched.pt")
    again[again.index("0.1")] = "0.3"
    again[again.index(str(tmp_path / "switched.pt"), again.index("--out"))] = str(tmp_path / "again.pt")
    res = CliRunner().invoke(main, again)
    assert res.exit_code == 0, res.output
    redone = load_pretrained(tmp_path / "again.pt")
    assert torch.equal(redone.cond.fallback.out.weight, model.cond.fallback.out.weight)
    assert redone.cfg.cond_switch_departure == pytest.approx(float(torch.quantile(own.double(), 0.3)))
    bad = CliRunner().invoke(main, [str(a) for a in args[:4]] + [str(tmp_path / "none.pt")]
                             + [str(a) for a in args[5:]])
    assert bad.exit_code != 0 and "none.pt" in bad.output and "Traceback" not in bad.output


def test_fit_cond_trains_a_switched_models_own_net_alone(tmp_path):
    model = _tiny(0)
    attach_fallback(model, _tiny(1).cond, torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), 0.5)
    save_checkpoint(tmp_path / "switched.pt", model)
    faces = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "faces.npz", images=faces)
    res = CliRunner().invoke(main, ["fit-cond", "--data", str(tmp_path / "faces.npz"), "--init",
                                    str(tmp_path / "switched.pt"), "--keep-net", "--steps", "1",
                                    "--batch-size", "4", "--n-val", "8", "--out",
                                    str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "fallback net is left out" in res.output
    trained = load_pretrained(tmp_path / "run" / "cond.pt")
    assert not trained.cfg.cond_fallback and trained.cond.fallback is None
    assert not any(k.startswith("cond.fallback.") for k in trained.state_dict())
