"""`shardserve serve` arguments into ServerSettings (no Ray): model name aliases."""

from __future__ import annotations

import pytest

from api.cli import build_parser, settings_from_args
from api.settings import DEFAULT_MODEL_NAME, ServerSettings


def test_served_model_name_takes_aliases_the_first_primary():
    args = build_parser().parse_args(["serve", "--served-model-name", "llama-8b", "meta-llama/Llama-3.1-8B"])
    settings = settings_from_args(args)
    assert settings.model_names() == ["llama-8b", "meta-llama/Llama-3.1-8B"]
    assert settings.model_name() == "llama-8b"
    one = settings_from_args(build_parser().parse_args(["serve", "--served-model-name", "only"]))
    assert one.model_names() == ["only"]
    assert ServerSettings.from_dict({"served_model_name": "from-yaml"}).model_names() == ["from-yaml"]
    assert ServerSettings().model_names() == [DEFAULT_MODEL_NAME]


@pytest.mark.parametrize("bad", [[""], ["a", 5]])
def test_empty_or_non_string_aliases_are_refused(bad):
    with pytest.raises(ValueError, match="served_model_name must be"):
        ServerSettings(served_model_name=bad)
