"""LoRA fine-tuning (trainers/lora.py): the recorded adapters, merged onto the base weights by a
LoRA trajectory, give back the fine-tuned model; and the demo's LoRA mode end to end."""

import json
import pathlib

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("sklearn")

import lcsc_fast  # noqa: E402
from lcsc_fast.trainers import common, ct, lora  # noqa: E402

TINY = {"width": 32, "depth": 1, "batch_size": 16, "progress": False, "warmup_steps": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = ct.train(ct.CTConfig(out=str(root / "ct"), steps=4, every=2, **TINY))
    tuned = lora.train(lora.LoRAConfig(out=str(root / "lora"), base=base.directory, steps=6,
                                       every=2, rank=2, alpha=4.0, lr=1e-2, **TINY))
    return base, tuned


def test_snapshots_hold_the_adapters_only(runs):
    _, tuned = runs
    with open(f"{tuned.trajectory_dir}/manifest.json") as f:
        manifest = json.load(f)
    assert [s["step"] for s in manifest["snapshots"]] == [2, 4, 6]
    with safe_open(f"{tuned.trajectory_dir}/{manifest['snapshots'][0]['file']}", "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


def test_a_lora_run_folder_is_not_trained_into_again(runs):
    """Refused before anything is written, adapter_config.json included."""
    base, tuned = runs
    folder = pathlib.Path(tuned.directory)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="holds a run already"):
        lora.train(lora.LoRAConfig(out=tuned.directory, base=base.directory, steps=2, every=1,
                                   rank=4, alpha=1.0, **TINY))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_merging_the_last_adapter_gives_the_fine_tuned_model(runs):
    base, tuned = runs
    with lora.open_trajectory(tuned.directory) as traj:
        assert len(traj) == 3
        plain = common.load_model(base.directory, "model")
        before = {k: v.clone() for k, v in plain.state_dict().items()}
        lcsc_fast.merge_into(plain, traj, [0.0, 0.0, 1.0])
    x, sigma = torch.randn(8, 1, 8, 8), torch.full((8,), 1.5)
    with torch.no_grad():
        expected = tuned.model.eval()(x, sigma)
        got = plain(x, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Every adapted layer moved off W0; nothing else did.
    adapted = {f"{p}.weight" for p in common.read_config(tuned.directory)["lora"]["layers"]}
    for name, w in plain.state_dict().items():
        if name in adapted:
            assert not torch.equal(w, before[name]), name
        else:
            assert torch.equal(w, before[name]), name


def test_lora_on_conv_layers_reshapes_to_the_kernel():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1))
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1))
    reference.load_state_dict(net.state_dict())
    lora.add_lora(net, rank=2, alpha=2.0)
    torch.nn.init.normal_(net[0].lora_B.weight)
    delta = (net[0].lora_B.weight.flatten(1) @ net[0].lora_A.weight.flatten(1)).view(5, 3, 3, 3)
    reference[0].weight.data += delta
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_demo_lora_mode(tmp_path):
    pytest.importorskip("cleanfid")
    from lcsc_fast import demo

    config = demo.DemoConfig.quick(out=str(tmp_path / "demo"), train_steps=40, checkpoints=8,
                                   lora=True, lora_steps=16, budget=8, search_samples=64,
                                   eval_samples=64, progress=False)
    results = demo.run(config)
    methods = [m["method"] for m in results["methods"]]
    assert methods[:2] == ["last checkpoint", "EMA 0.999 (training)"]
    assert [m for m in methods if m.startswith("LoRA:")][-1] == "LoRA: LCSC"
    lora_rows = [m for m in results["methods"] if m["method"].startswith("LoRA:")]
    assert all(m["training_steps"] == 40 + 16 for m in lora_rows)
    assert (tmp_path / "demo" / "coefficients-lora.png").exists()
