"""Config dataclasses drive the CLI and YAML alike."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

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
    assert record["lorashear_version"] and json.loads(json.dumps(record))["ratios"] == [0.2, 0.5]
