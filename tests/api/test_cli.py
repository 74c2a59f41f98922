"""`shardserve serve` arguments into ServerSettings (no Ray): model name aliases, intake workers."""

from __future__ import annotations

import pytest

from api.cli import build_parser, settings_from_args
from api.settings import DEFAULT_INTAKE_WORKERS, DEFAULT_MODEL_NAME, ServerSettings


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


def test_intake_workers_default_to_two_with_prompt_embeds_on_a_gpu_and_none_elsewhere():
    parse = lambda *flags: settings_from_args(build_parser().parse_args(["serve", *flags]))  # noqa: E731
    assert parse().intake_workers is None
    assert parse("--enable-prompt-embeds", "--device", "cuda").num_intake_workers() == DEFAULT_INTAKE_WORKERS == 2
    assert parse("--enable-prompt-embeds", "--device", "cpu").num_intake_workers() == 0
    assert parse("--device", "cuda").num_intake_workers() == 0
    assert parse("--enable-prompt-embeds", "--device", "cpu", "--intake-workers", "3").num_intake_workers() == 3
    assert parse("--enable-prompt-embeds", "--device", "cuda", "--intake-workers", "0").num_intake_workers() == 0
    assert ServerSettings.from_dict({"intake_workers": 1}).intake_workers == 1
    with pytest.raises(ValueError, match="intake_workers must be >= 0"):
        ServerSettings(intake_workers=-1)
