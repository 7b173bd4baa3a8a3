"""`lcsc-fast demo --quick`: the whole pipeline (train, record, search, evaluate, report)."""

import json
import math
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("cleanfid")

from lcsc_fast import cli  # noqa: E402


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert cli.main(["demo", "--quick", "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    return out


def test_report_folder_holds_summary_results_and_figures(quick_demo):
    names = {p.name for p in quick_demo.iterdir()}
    assert {"summary.md", "results.json", "search.png", "coefficients.png",
            "coefficients-first-quarter.png", "search-first-quarter.png", "run"} <= names
    results = json.loads((quick_demo / "results.json").read_text())
    for method in results["methods"]:
        assert (quick_demo / method["samples_png"]).stat().st_size > 0
    summary = (quick_demo / "summary.md").read_text()
    assert "| LCSC |" in summary and "seed 3" in summary


def test_results_name_every_method_with_fid_steps_nfe_and_samples(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    methods = {m["method"].split(" (")[0]: m for m in results["methods"]}
    assert {"last checkpoint", "EMA 0.999", "EMA*", "LCSC", "first 25%: EMA*",
            "first 25%: LCSC"} <= set(methods)
    total = results["checkpoint_steps"][-1]
    assert methods["LCSC"]["training_steps"] == total
    assert methods["first 25%: LCSC"]["training_steps"] == total // 4
    for m in results["methods"]:
        assert math.isfinite(m["fid"]) and m["fid"] > 0
        assert m["nfe"] == 1 and m["samples"] == 1000
    assert all(math.isfinite(m["search_fid"]) for m in results["methods"])
    lcsc = methods["LCSC"]["coefficients"]
    assert len(lcsc) == len(results["checkpoint_steps"])
    assert math.isclose(sum(lcsc), 1.0, abs_tol=1e-9)


def test_refuses_to_run_over_an_earlier_demo(quick_demo, capsys):
    assert cli.main(["demo", "--quick", "--out", str(quick_demo), "--no-progress"]) == 2
    assert f"{quick_demo} is not empty (a demo ran there before?)" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_quick_settings_pass_the_demos_checks(tmp_path, lora):
    from lcsc_fast import demo

    demo.DemoConfig.quick(out=str(tmp_path / "new"), lora=lora).check()
    demo.DemoConfig(out=str(tmp_path / "new"), lora=lora).check()


def test_demo_options_reach_its_config(tmp_path, monkeypatch):
    from lcsc_fast import demo

    seen = []
    monkeypatch.setattr(demo, "run", seen.append)
    argv = ["demo", "--quick", "--lora", "--lora-steps", "80", "--checkpoints", "8", "--steps",
            "160", "--out", str(tmp_path / "d"), "--no-progress"]
    assert cli.main(argv) == 0
    (config,) = seen
    assert (config.lora, config.lora_steps, config.checkpoints, config.train_steps) == (
        True, 80, 8, 160)
    config.check()


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.md").write_text("my own notes")
    code = cli.main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert code == 2
    assert f"{out} is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["summary.md"]
    assert (out / "summary.md").read_text() == "my own notes"


@pytest.mark.parametrize("steps", ["1", "2"])
def test_demo_refuses_sample_steps_with_the_dm_trainer(tmp_path, monkeypatch, capsys, steps):
    """The dm demo samples at Heun NFE 15 and 9 whatever --sample-steps says, so the option is a
    usage error there, even at 1 (the consistency models' default); the other trainers get it."""
    from lcsc_fast import demo

    seen = []
    monkeypatch.setattr(demo, "run", seen.append)
    tail = ["--out", str(tmp_path / "d"), "--no-progress"]
    assert cli.main(["demo", "--quick", "--trainer", "dm", "--sample-steps", steps, *tail]) == 2
    assert f"--sample-steps {steps}: only consistency models" in capsys.readouterr().err
    assert seen == []
    assert cli.main(["demo", "--quick", "--trainer", "dm", *tail]) == 0
    assert cli.main(["demo", "--quick", "--trainer", "ect", "--sample-steps", steps, *tail]) == 0
    assert [(c.trainer, c.sample_steps) for c in seen] == [("dm", 1), ("ect", int(steps))]
    for config in seen:
        config.check()


@pytest.mark.parametrize("trainer,steps,match", [
    ("dm", 2, r"^sample_steps: 2 is for consistency models .* NFE 15 and 9"),
    ("ct", 3, r"^sample_steps: 3; consistency models sample in 1 or 2 steps"),
], ids=["dm-2", "ct-3"])
def test_demo_config_refuses_sample_steps_it_cannot_use(tmp_path, trainer, steps, match):
    """Library callers of DemoConfig get the same refusal before any training (the consistency
    sampler would raise only after it)."""
    from lcsc_fast import demo

    config = demo.DemoConfig.quick(out=str(tmp_path / "d"), trainer=trainer, sample_steps=steps)
    with pytest.raises(ValueError, match=match):
        config.check()


def test_demo_without_clean_fid_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    """Without clean-fid importable the demo stops before doing anything, naming the extra."""
    monkeypatch.setitem(sys.modules, "cleanfid", None)  # import cleanfid: ImportError
    out = tmp_path / "d"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the demo needs scikit-learn and clean-fid" in err
    assert "pip install 'lcsc_fast[demo]'" in err
    assert not out.exists()
