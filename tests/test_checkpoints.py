"""fastnmf.checkpoints: the format check, old key spellings, the resume rules; CLI error handling
(--debug, programming errors keep their traceback) and the renamed options' old spellings."""

import fastnmf.models as models
import pytest
import torch

from fastnmf import checkpoints as ck
from fastnmf import config as fconfig
from fastnmf import data as fdata
from fastnmf.cli import build_parser, main
from fastnmf.config import TrainConfig, resolve


def _write(path, **changes):
    cfg = resolve("demo", crop_size=16, steps=4, warmup=1)
    info = ck.info_to_dict(fdata.dataset_info("demo"))
    state = {"format": ck.CHECKPOINT_FORMAT, "config": cfg.to_dict(), "info": info, "model": {},
             "step": 3}  # fmt: skip
    state.update(changes)
    state = {k: v for k, v in state.items() if v is not None}
    torch.save(state, path)
    return path


def test_format_is_written_and_checked(tmp_path):
    ckpt = ck.load_checkpoint(_write(tmp_path / "a.pt"))
    assert ckpt["format"] == ck.CHECKPOINT_FORMAT and ckpt["step"] == 3
    # checkpoints written before the field was checked have no "format": read as format 1
    assert ck.load_checkpoint(_write(tmp_path / "b.pt", format=None))["step"] == 3
    with pytest.raises(ck.CheckpointError, match=r"c.pt: checkpoint format 99 is unknown"):
        ck.load_checkpoint(_write(tmp_path / "c.pt", format=99))


def test_old_patch_key_still_reads_with_a_warning(tmp_path):
    cfg = resolve("demo", crop_size=16).to_dict()
    cfg["patch"] = cfg.pop("crop_size")  # a config.json / checkpoint of the previous release
    with pytest.warns(DeprecationWarning, match="'patch' is now 'crop_size'"):
        old = ck.config_of(ck.load_checkpoint(_write(tmp_path / "old.pt", config=cfg)))
    assert old.crop_size == 16
    with pytest.raises(ValueError, match="both 'patch'"), pytest.warns(DeprecationWarning):
        TrainConfig.from_dict({**cfg, "crop_size": 16})
    info = ck.info_to_dict(fdata.dataset_info("isles"))
    info["patch_size"] = info.pop("crop_size")
    assert ck.info_from_dict(info).crop_size == (64, 64, 64)
    with pytest.warns(DeprecationWarning, match="DatasetInfo.patch_size is now crop_size"):
        assert fdata.dataset_info("isles").patch_size == (64, 64, 64)


def test_resume_rules(tmp_path):
    path = _write(tmp_path / "last.pt")
    assert ck.resume_target("last", tmp_path) == (tmp_path / "last.pt", tmp_path)
    assert ck.resume_target(str(tmp_path), None) == (tmp_path / "last.pt", tmp_path)
    with pytest.raises(ValueError, match="needs --out"):
        ck.resume_target("last", None)
    cfg = ck.resume_config(path, {"device": "cpu", "lr": None})
    with pytest.warns(DeprecationWarning, match="'patch' is now 'crop_size'"):
        assert ck.resume_config(path, {"patch": 16}).crop_size == 16
    assert cfg.device == "cpu" and cfg.lr == resolve("demo").lr and cfg.crop_size == 16
    ckpt = ck.load_checkpoint(path)
    ck.check_resume(ckpt, cfg, path=path)  # a runtime setting may change
    with pytest.raises(ValueError, match=r"last.pt: the checkpoint's config differs in lr"):
        ck.check_resume(ckpt, ck.resume_config(path, {"lr": 0.5}), path=path)


def test_old_spellings_of_renamed_names():
    with pytest.warns(DeprecationWarning, match="--patch is now --crop-size"):
        args = build_parser().parse_args(["train", "--patch", "24"])
    assert args.crop_size == 24
    assert build_parser().parse_args(["train", "--crop-size", "8"]).crop_size == 8
    with pytest.warns(DeprecationWarning):
        assert resolve("demo", patch=24).crop_size == 24
    assert fconfig.PRESETS is fconfig.RUN_PRESETS and "demo" in fconfig.RUN_PRESETS
    assert models.PRESETS is models.ARCH_PRESETS and "brats" in models.ARCH_PRESETS


def test_cli_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["infer", "--checkpoint", str(tmp_path / "none.pt")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnmf infer: error: ") and "Traceback" not in err
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        assert main(debug) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "CheckpointError" in err
        assert "none.pt: checkpoint not found" in err


def test_cli_programming_error_keeps_its_traceback(monkeypatch):
    import fastnmf.cli as cli

    def broken(args):
        raise TypeError("a bug, not bad input")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["info"])


def test_unknown_model_option_is_a_value_error():
    with pytest.raises(ValueError, match=r"model 'nnunet' has no option\(s\) window.*valid"):
        resolve("demo", model="nnunet", model_options={"window": 4})
