"""Config dataclasses drive the CLI and YAML alike."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from lorashear import __version__
from lorashear.config import add_dataclass_arguments, check_known_keys, dataclass_from_args, load_yaml, to_json_dict
from lorashear.errors import ConfigError


@dataclass
class Example:
    ratio: float = field(default=0.2, metadata={"help": "fraction to remove"})
    ratios: tuple[float, ...] = field(default=(0.2, 0.5), metadata={"help": "ratios"})
    name: str = field(default="x", metadata={"help": "a name"})
    flag: bool = field(default=False, metadata={"help": "a switch"})

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Example)
    return parser


def test_cli_overrides_yaml_overrides_defaults(tmp_path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("ratio: 0.3\nname: from-yaml\nratios: [0.1, 0.4]\n")
    ns = _parser().parse_args(["--name", "from-cli", "--flag"])
    cfg = dataclass_from_args(Example, ns, load_yaml(yaml_file))
    assert cfg == Example(ratio=0.3, ratios=(0.1, 0.4), name="from-cli", flag=True)
    assert dataclass_from_args(Example, _parser().parse_args([])) == Example()


def test_list_flag_and_validation() -> None:
    ns = _parser().parse_args(["--ratios", "0.25,0.75"])
    assert dataclass_from_args(Example, ns).ratios == (0.25, 0.75)
    with pytest.raises(ConfigError, match="ratio"):
        dataclass_from_args(Example, _parser().parse_args(["--ratio", "1.5"]))


def test_unknown_yaml_key_is_rejected(tmp_path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("ratoi: 0.3\n")
    with pytest.raises(ConfigError, match="ratoi"):
        check_known_keys(load_yaml(yaml_file), Example)


def test_json_record_has_version() -> None:
    record = to_json_dict(Example())
    assert record["lorashear_version"] == __version__
    assert json.loads(json.dumps(record)) == {"ratio": 0.2, "ratios": [0.2, 0.5], "name": "x", "flag": False,
                                              "lorashear_version": __version__}


# -- composed configs: sections, flat names, nested YAML --------------------------------------
from lorashear.config import config_from_dict, options, resolve_config, section, to_flat_dict  # noqa: E402


@dataclass
class Inner:
    r: int = field(default=8, metadata={"help": "rank"})
    targets: tuple[str, ...] = field(default=(), metadata={"help": "targets"})


@dataclass
class Outer:
    model: str = field(default="", metadata={"help": "model", "cli": False})
    steps: int = field(default=10, metadata={"help": "steps"})
    lora: Inner = section(Inner, prefix="lora_", r=4)


def test_sections_flatten_with_prefix_and_section_defaults() -> None:
    assert set(options(Outer)) == {"model", "steps", "lora_r", "lora_targets"}
    assert Outer().lora == Inner(r=4) == config_from_dict(Outer, {}).lora  # the section's defaults win
    cfg = config_from_dict(Outer, {"lora_r": 2, "lora_targets": ["q", "v"]})
    assert cfg.lora == Inner(r=2, targets=("q", "v"))
    assert config_from_dict(Outer, {"lora": {"r": 3}}).lora.r == 3  # nested YAML form
    assert config_from_dict(Outer, to_flat_dict(cfg)) == cfg  # the flat record reads back


@pytest.mark.parametrize("values, word", [({"lora_rr": 1}, "lora_rr"), ({"lora": {"rr": 1}}, "lora.rr"),
                                          ({"steps": "many"}, "steps"), ({"lora_r": 1.5}, "lora_r"),
                                          ({"steps": True}, "steps")])
def test_unknown_or_mistyped_options_are_named(values, word) -> None:
    with pytest.raises(ConfigError, match=word.replace(".", r"\.")):
        config_from_dict(Outer, values)


def test_flags_override_yaml_and_positionals_override_flags(tmp_path) -> None:
    from lorashear.config import add_config_arguments

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: from-yaml\nsteps: 3\nlora:\n  r: 5\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer)
    cfg = resolve_config(Outer, parser.parse_args(["--lora-r", "7"]), yaml_path=yaml_file)
    assert (cfg.model, cfg.steps, cfg.lora.r) == ("from-yaml", 3, 7)
    cfg = resolve_config(Outer, parser.parse_args([]), yaml_path=yaml_file, fixed={"model": "cli", "steps": None})
    assert (cfg.model, cfg.steps) == ("cli", 3)


def test_malformed_yaml_is_one_line_error(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(Outer, yaml_path=bad)


def test_an_option_declared_twice_is_a_definition_error() -> None:
    @dataclass
    class Twice:
        r: int = 1
        lora: Inner = section(Inner)

    with pytest.raises(TypeError, match="declared twice"):
        options(Twice)
