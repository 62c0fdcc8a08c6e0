"""The payload parser and selector logic, without servers."""

from __future__ import annotations

import pytest

from registry.errors import PayloadError, SelectorError, SettingsError
from registry.payload import ModelSection, RegistryPayload
from registry.record import ModelRecord, Selector
from registry.settings import RegistrySettings
from registry.signing import PayloadCodec, SignatureError


def rec(version: str, *aliases: str) -> ModelRecord:
    return ModelRecord(name="m", version=version, model_uri=f"models:/security_m/{version}", aliases=aliases, source="t")


def test_selector_parsing():
    assert Selector.parse("latest") == Selector("latest", "latest")
    assert Selector.parse("best") == Selector("alias", "best")
    assert Selector.parse("champion") == Selector("alias", "champion")
    assert Selector.parse("12") == Selector("version", "12")
    assert Selector.parse(12) == Selector("version", "12")
    for bad in ("", "0", "-1", "a b", "x" * 300, None, True, 1.5, "ümlaut", "LATEST", "v3", "1\u0661", 10**5000):
        with pytest.raises(SelectorError):
            Selector.parse(bad)
    assert Selector.from_request(alias="best", version="3") == Selector("version", "3")
    with pytest.raises(SelectorError):
        Selector.from_request(version="best")


def test_section_selects():
    section = ModelSection.from_records("m", [rec("1", "champion"), rec("3"), rec("2", "best")])
    assert section.select(Selector.parse("latest"), custom_aliases=False).version == "3"
    assert section.select(Selector.parse("best"), custom_aliases=False).version == "2"
    assert section.select(Selector.parse("2"), custom_aliases=False).version == "2"
    assert section.select(Selector.parse("9"), custom_aliases=False) is None
    assert section.select(Selector.parse("champion"), custom_aliases=False) is None
    assert section.select(Selector.parse("champion"), custom_aliases=True).version == "1"


def test_payload_round_trip_keeps_seed_keys_and_other_models():
    payload = RegistryPayload.empty().with_section(ModelSection.from_records("a", [rec("1")]))
    payload = payload.with_section(ModelSection.from_records("m", [rec("1"), rec("2", "best")]))
    parsed = RegistryPayload.parse(PayloadCodec().encode(payload), "t")
    assert set(parsed.raw) == {"latest_models", "best_models", "versions", "timestamp"}
    assert parsed.model_names() == ["a", "m"]
    m = parsed.section("m", source="redis")
    assert m.latest.version == "2" and m.best.version == "2" and m.latest.source == "redis"


def test_seed_payload_without_versions_reads():
    seed = {"latest_models": {"m": {"version": 4, "model_uri": "models:/security_m/4"}}, "timestamp": "2025-01-01T00:00:00"}
    section = RegistryPayload.parse(seed, "seed").section("m", source="file")
    assert section.select(Selector.parse("latest"), custom_aliases=False).version == "4"


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"latest_models": 1}', b'{"latest_models": {}, "versions": []}', b"\xff"])
def test_bad_top_level_shapes(raw):
    with pytest.raises(PayloadError):
        RegistryPayload.parse(raw, "t")


def test_settings_name_the_bad_variable(monkeypatch):
    monkeypatch.setenv("REGISTRY_CACHE_TTL", "soon")
    with pytest.raises(SettingsError, match="REGISTRY_CACHE_TTL"):
        RegistrySettings.from_env()
    monkeypatch.setenv("REGISTRY_CACHE_TTL", "60")
    monkeypatch.setenv("REGISTRY_ALIAS", "not an alias")
    with pytest.raises(SettingsError, match="REGISTRY_ALIAS"):
        RegistrySettings.from_env()
    monkeypatch.setenv("REGISTRY_ALIAS", "best")
    monkeypatch.setenv("REGISTRY_MODELS", "a, b,")
    monkeypatch.setenv("REGISTRY_FALLBACK_MODELS", '{"a": "/models/a"}')
    settings = RegistrySettings.from_env()
    assert settings.models == ["a", "b"] and settings.fallback_models == {"a": "/models/a"} and settings.cache_ttl == 60
    monkeypatch.setenv("REGISTRY_FALLBACK_MODELS", "{broken")
    with pytest.raises(SettingsError, match="REGISTRY_FALLBACK_MODELS"):
        RegistrySettings.from_env()


def test_signed_payloads_verify_and_refuse_tampering():
    payload = RegistryPayload.empty().with_section(ModelSection.from_records("m", [rec("1"), rec("2", "best")]))
    signer = PayloadCodec("k1")
    text = signer.encode(payload)
    assert '"signature":"hmac-sha256:' in text
    assert signer.decode(text, "t").section("m", source="t").best.version == "2"
    assert PayloadCodec().decode(text, "t").section("m", source="t").latest.version == "2", "unsigned readers still read"
    with pytest.raises(SignatureError, match="another key"):
        PayloadCodec("k2").decode(text, "t")
    with pytest.raises(SignatureError, match="another key"):
        signer.decode(text.replace('"version":"1"', '"version":"9"'), "t")
    with pytest.raises(SignatureError, match="unsigned"):
        signer.decode(PayloadCodec().encode(payload), "t")


def test_merging_sections_never_loses_a_version():
    older = ModelSection.from_records("m", [rec("1"), rec("2", "best")])
    newer = ModelSection.from_records("m", [rec("1"), rec("3")])
    merged = newer.merged_with(older)
    assert [r.version for r in merged.versions] == ["1", "2", "3"]
    assert merged.latest.version == "3" and merged.best.version == "2"
    payload = RegistryPayload.empty().with_section(older).merge_section(newer)
    assert [r.version for r in payload.section("m", source="t").versions] == ["1", "2", "3"]
