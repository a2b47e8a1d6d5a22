"""``--config``: every stage command rejects an unknown key or a wrongly typed value with one
line naming it, exit code 2, before any model is loaded or anything is written."""

from __future__ import annotations

import pytest

from lorashear.cli import main

MODEL = "smollm2-135m-instruct"

#: an option of each command whose value must be an integer
INT_OPTION = {"analyze": "seed", "prune": "steps", "recover": "steps", "eval": "seed", "run": "steps",
              "groups": "lora_rank"}

COMMANDS = ["analyze", "prune", "recover", "eval", "run", "groups"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model or tokenizer fails the test: the config must be checked first."""
    import lorashear.models.loading as loading

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(loading, "load_model", forbidden)
    monkeypatch.setattr(loading, "load_tokenizer", forbidden)


@pytest.mark.parametrize("bad", ["unknown_key", "wrong_type"])
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_config_is_one_line_exit_2(command, bad, tmp_path, capsys, no_model_loading):
    key = "stepz" if bad == "unknown_key" else INT_OPTION[command]
    config = tmp_path / "config" / "bad.yaml"
    config.parent.mkdir()
    config.write_text(f"{key}: 3\n" if bad == "unknown_key" else f"{key}: many\n")
    out = tmp_path / "out"
    argv = [command, MODEL, "--config", str(config)]
    if command != "groups":  # groups writes nothing and takes no --out
        argv += ["--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refusing the flag itself (e.g. no --config yet)
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"lorashear {command}: error:") and repr(key) in err[0], err[0]
    assert not out.exists()
