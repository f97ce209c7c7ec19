"""The segmentation options of the command line: --seg-models/--no-seg, --parc-models/--no-parc."""

from __future__ import annotations

from pathlib import Path

import pytest

from bids_app.cli.parser import get_parser
from bids_app.cli.run import build_config
from bids_app.errors import EXIT_USAGE

POSITIONAL = ["bids", "out", "participant"]


def _parse(*extra):
    return get_parser().parse_args([*POSITIONAL, *map(str, extra)])


def test_parc_options_parse():
    opts = _parse()
    assert opts.parc_models is None and opts.no_parc is False and opts.no_seg is False
    opts = _parse("--parc-models", "a.json", "b", "--seg-models", "w.json", "--mc-samples", "2")
    assert opts.parc_models == [Path("a.json"), Path("b")] and opts.seg_models == [Path("w.json")]
    assert opts.mc_samples == 2
    assert _parse("--no-parc").no_parc is True
    assert _parse("--no-parc", "--no-seg").no_seg is True
    assert _parse("--no-parc", "--seg-models", "w.json").seg_models == [Path("w.json")]
    help_text = get_parser().format_help()
    assert "--parc-models PATH [PATH ...]" in help_text and "--no-parc" in help_text


@pytest.mark.parametrize("extra", [["--parc-models", "a.json", "--no-parc"],
                                   ["--parc-models", "a.json", "--no-seg"],
                                   ["--no-seg", "--parc-models", "a.json"]])
def test_parc_option_conflicts_are_usage_errors(extra, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(*extra)
    assert exc.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_switches_reach_the_run_config(tmp_path, monkeypatch, no_package_models):
    from tests.conftest import tiny_parcellation_checkpoint, tiny_wholebrain_checkpoint

    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bids").mkdir()

    def config(*extra):
        return build_config(_parse(*extra), [])[0]

    parc = tiny_parcellation_checkpoint(tmp_path / "parc")
    wb = tiny_wholebrain_checkpoint(tmp_path / "wb")
    cfg = config("--seg-models", wb, "--parc-models", parc, "--mc-samples", "2")
    assert cfg.segmentation.active and cfg.parcellation.active
    assert cfg.parcellation.checkpoints == (parc.resolve(),) and cfg.parcellation.protocol == "dkt-aseg"
    assert cfg.parcellation.origin == "--parc-models" and cfg.parcellation.mc_samples == 2
    assert cfg.parcellation.task == "parcellation" and cfg.segmentation.protocol == "aseg"
    assert "[parcellation]" in cfg.to_toml()
    off = config("--seg-models", wb, "--no-parc")
    assert off.segmentation.active and not off.parcellation.enabled
    assert off.parcellation.reason == "switched off with --no-parc"
    both_off = config("--no-seg")
    assert not both_off.segmentation.enabled and not both_off.parcellation.enabled
    assert both_off.parcellation.reason == "switched off with --no-seg"
    none = config()  # nothing installed: enabled, not active, says why
    assert none.parcellation.enabled and not none.parcellation.active
    assert "no cortical parcellation models are installed" in none.parcellation.reason
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path))  # installed: picked by their manifest's task
    installed = config()
    assert installed.parcellation.checkpoints == (parc.resolve(),) and installed.parcellation.origin == "installed"
    assert installed.segmentation.checkpoints == (wb.resolve(),)


@pytest.fixture
def tiny_config(tmp_path, monkeypatch, no_package_models):
    """``config(*options)``: the run configuration with a tiny whole-brain model and nothing installed."""
    from tests.conftest import tiny_wholebrain_checkpoint

    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bids").mkdir()
    wb = tiny_wholebrain_checkpoint(tmp_path / "wb")

    def config(*extra):
        return build_config(_parse("--seg-models", wb, *extra), [])[0]

    return config


def test_tta_option_default_follows_the_mc_samples(tiny_config):
    config = tiny_config
    assert config().segmentation.tta == "flip-shift" and config().parcellation.tta == "flip-shift"
    assert config("--mc-samples", "3").segmentation.tta == "flip"  # the largest that the samples allow
    assert config("--mc-samples", "1").segmentation.tta == "none"
    assert config("--tta", "shift", "--mc-samples", "2").segmentation.tta == "shift"
    assert config("--tta", "none").segmentation.tta == "none"
    assert "tta = \"none\"" in config("--tta", "none").to_toml()


def test_refinement_option_defaults_to_intensity(tiny_config):
    default = tiny_config()
    assert default.segmentation.refinement == "intensity" and default.parcellation.refinement == "intensity"
    off = tiny_config("--refinement", "none")
    assert off.segmentation.refinement == "none" and "refinement = \"none\"" in off.to_toml()
    with pytest.raises(SystemExit) as exc:
        _parse("--refinement", "crf")
    assert exc.value.code == EXIT_USAGE


def test_tta_needs_as_many_samples_as_views(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse("--tta", "flip-shift", "--mc-samples", "3")
    assert exc.value.code == EXIT_USAGE
    assert "flip-shift has 4 views" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse("--tta", "rotate")
