"""Property-based tests of the values that flow through the chain: selectors, entries, payloads.

No servers: every property runs on generated data. The contracts checked here are the ones the
chain relies on: a malformed selector or payload fails with the project's own error type (the
resolver only turns `PayloadError` into a REJECTED layer; anything else escapes the chain), and a
payload written by one layer reads back to the same records in the next.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from registry.errors import PayloadError, SelectorError
from registry.payload import SECTIONS, ModelSection, RegistryPayload
from registry.record import BEST, LATEST, ModelRecord, Selector
from registry.signing import PayloadCodec

PROPS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KINDS = {"latest", "alias", "version"}
ENTRY_FIELDS = ("name", "version", "model_uri", "artifact_uri", "run_id", "metrics", "aliases", "sha256", "created_at")
MAX_VERSION = 10**18 - 1  # the longest version the selector grammar admits (18 digits)

# What a JSON decoder can hand back: the values a cache, an HTTP body or a backup file may hold.
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)
# Text shaped like the grammar the product uses (`\d` and `$` as Python reads them), plus plain text.
version_like = st.from_regex(r"^[1-9]\d{0,17}$") | st.integers(min_value=-3, max_value=MAX_VERSION + 3)
alias_like = st.from_regex(r"^[A-Za-z_][\w\-]{0,20}$")
selector_inputs = st.one_of(
    st.text(max_size=30),
    st.integers(),
    version_like,
    alias_like,
    st.sampled_from([LATEST, BEST, f" {LATEST}\n", "\tbest ", "Latest", "LATEST", "v1", "0", "00", "-1", "a b", ""]),
    st.floats(),
    st.none(),
    st.booleans(),
    st.binary(max_size=10),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(object),
)

# Realistic registry data: ASCII aliases as MLflow stores them, never the reserved `latest`.
ALIAS_HEAD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
alias_names = (st.just(BEST) | st.builds(
    str.__add__, st.sampled_from(ALIAS_HEAD), st.text(alphabet=ALIAS_HEAD + "0123456789-", max_size=15),
)).filter(lambda a: not re.fullmatch(r"(?i:latest)|[vV][0-9]+", a))  # names MLflow reserves
model_names = st.text(min_size=1, max_size=12)
opt_text = st.none() | st.text(max_size=20)
metrics = st.dictionaries(
    st.text(max_size=10),
    st.floats(allow_nan=False) | st.integers(min_value=-10**6, max_value=10**6),  # NaN != NaN would defeat equality
    max_size=3,
)
sha256s = st.none() | st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def model_histories(draw: st.DrawFn, name: Any = None) -> tuple[str, list[ModelRecord], dict[str, int]]:
    """A model's versions as the publisher registers them; each alias on at most one version, as in MLflow.

    Returns the name, the records (in random order) and which version owns each alias.
    """
    name = draw(model_names) if name is None else name
    versions = draw(st.lists(st.integers(min_value=1, max_value=MAX_VERSION), min_size=1, max_size=6, unique=True))
    aliases = draw(st.lists(alias_names, unique=True, max_size=4))
    owner = {alias: draw(st.sampled_from(versions)) for alias in aliases}
    records = [
        ModelRecord(
            name=name,
            version=str(v),
            model_uri=draw(st.text(min_size=1, max_size=30)),
            artifact_uri=draw(opt_text),
            run_id=draw(opt_text),
            metrics=draw(metrics),
            aliases=tuple(sorted(a for a, o in owner.items() if o == v)),
            sha256=draw(sha256s),
            source="publisher",
            created_at=draw(opt_text),
        )
        for v in versions
    ]
    return name, draw(st.permutations(records)), owner


# Payload-shaped objects whose model entries are half valid, half garbage.
entry_values = {
    "name": st.text(max_size=6) | json_values,
    "version": version_like | json_values,
    "model_uri": st.text(max_size=10) | json_values,
    "artifact_uri": opt_text | json_values,
    "run_id": opt_text | json_values,
    "metrics": metrics | json_values,
    "aliases": st.lists(st.text(max_size=6), max_size=3) | json_values,
    "sha256": sha256s | json_values,
    "created_at": opt_text | st.floats() | json_values,
}
entries = st.fixed_dictionaries({}, optional=entry_values) | json_values
entry_like = st.dictionaries(st.sampled_from(ENTRY_FIELDS) | st.text(max_size=6), json_values, max_size=6)
payload_shaped = st.fixed_dictionaries(
    {"latest_models": st.dictionaries(st.sampled_from(["m", "n"]) | st.text(max_size=4), entries, max_size=3)},
    optional={
        "best_models": st.dictionaries(st.sampled_from(["m", "n"]), entries, max_size=2) | json_values,
        "versions": st.dictionaries(st.sampled_from(["m", "n"]), st.lists(entries, max_size=3) | json_values, max_size=2)
        | json_values,
        "timestamp": st.text(max_size=30) | st.datetimes().map(lambda d: d.isoformat()) | json_values,
        "signature": json_values,
    },
)

# Inputs that are valid UTF-8 JSON but break a bare `json.loads`: what a corrupt cache or file can hold.
DEEPLY_NESTED = "[" * 100_000
HUGE_INT = "1" * 5000  # past CPython's 4300-digit limit for int parsing
HUGE_INT_METRIC = '{"latest_models":{"m":{"version":1,"model_uri":"u","metrics":{"f1":1' + "0" * 400 + "}}}}"


def check_record(record: ModelRecord, source: str) -> None:
    """The field types every consumer of a record relies on."""
    assert isinstance(record.name, str) and record.name
    assert isinstance(record.version, str)
    # a version is a positive integer written canonically: MLflow versions are ints, and `select`
    # matches version strings exactly while `latest` orders by `int(version)`
    assert record.version.isascii() and record.version.isdigit(), repr(record.version)
    assert record.version_number > 0 and str(record.version_number) == record.version, repr(record.version)
    assert isinstance(record.model_uri, str) and record.model_uri
    for optional in (record.artifact_uri, record.run_id, record.sha256, record.created_at):
        assert optional is None or isinstance(optional, str)
    assert record.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", record.sha256)
    assert all(isinstance(k, str) and type(v) is float for k, v in record.metrics.items())
    assert isinstance(record.aliases, tuple) and all(isinstance(a, str) for a in record.aliases)
    assert record.source == source
    assert isinstance(record.location, str) and record.location


# -- selectors -------------------------------------------------------------------------------------

@PROPS
@given(selector_inputs)
@example(10**5000)  # an int too long for str(): CPython raises ValueError, not SelectorError
@example("1\u0661")  # ARABIC-INDIC DIGIT ONE: `\d` matches it
@example("1\uff10")  # FULLWIDTH DIGIT ZERO
@example(True)
@example(" latest ")
def test_selector_parse_is_total(raw: object) -> None:
    try:
        selector = Selector.parse(raw)
    except SelectorError as exc:
        assert exc.selector is raw
        return
    assert isinstance(selector, Selector) and selector.kind in KINDS
    assert Selector.parse(selector) is selector
    assert Selector.parse(str(selector)) == selector, "a selector must survive its own text form (settings, logs, bus)"
    if selector.kind == "latest":
        assert selector.value == LATEST
    elif selector.kind == "version":
        assert selector.value.isascii() and selector.value.isdigit(), f"non-ASCII digits in version {selector.value!r}"
        assert int(selector.value) > 0 and str(int(selector.value)) == selector.value
    else:
        assert selector.value != LATEST, "`latest` is reserved by MLflow and never an alias"
        assert not selector.value[0].isdigit() and selector.value == selector.value.strip() and len(selector.value) <= 255


@PROPS
@given(st.integers(min_value=1, max_value=MAX_VERSION), st.text(alphabet=" \t\n", max_size=3))
def test_selector_versions_are_positive_ints(version: int, padding: str) -> None:
    expected = Selector("version", str(version))
    assert Selector.parse(version) == expected
    assert Selector.parse(f"{padding}{version}{padding}") == expected
    assert Selector.from_request(alias="best", version=version) == expected, "an exact version wins over an alias"


@PROPS
@given(st.integers(max_value=0) | st.integers(min_value=MAX_VERSION + 1) | st.booleans())
def test_selector_rejects_non_positive_oversized_and_bool_versions(version: int) -> None:
    for call in (lambda: Selector.parse(version), lambda: Selector.from_request(version=version)):
        try:
            call()
        except SelectorError:
            continue
        raise AssertionError(f"{version!r} accepted as a version")


@PROPS
@given(st.text(alphabet=" \t\n\r", max_size=4), st.text(alphabet=" \t\n\r", max_size=4))
def test_latest_is_never_an_alias(before: str, after: str) -> None:
    assert Selector.parse(before + LATEST + after) == Selector("latest", LATEST)
    assert Selector.from_request(alias=before + LATEST + after) == Selector("latest", LATEST)
    assert Selector.from_request(default=LATEST) == Selector("latest", LATEST)


@PROPS
@given(alias_names, st.none() | alias_names)
def test_selector_from_request_alias_and_default(alias: str, default: Any) -> None:
    assert Selector.from_request(alias=alias) == Selector("alias", alias)
    if default is not None:
        assert Selector.from_request(default=default) == Selector("alias", default)
    try:
        Selector.from_request(version=alias)
    except SelectorError:
        pass
    else:
        raise AssertionError(f"alias {alias!r} accepted as a version")


# -- entries ---------------------------------------------------------------------------------------

@PROPS
@given(entry_like | st.fixed_dictionaries({}, optional=entry_values), st.none() | st.sampled_from(["m", "n"]))
@example({"name": "m", "version": 1, "model_uri": "u", "metrics": {"f1": 10**400}}, None)  # float() overflows
@example({"name": "m", "version": 10**5000, "model_uri": "u"}, None)  # str() of a 5000-digit int raises ValueError
@example({"name": "m", "version": "1\n", "model_uri": "u"}, None)  # `$` matches before a trailing newline
@example({"name": "m", "version": "1\u0661", "model_uri": "u"}, None)  # `\d` matches non-ASCII digits
def test_record_from_entry_validates_or_raises_payload_error(entry: dict, name: Any) -> None:
    try:
        record = ModelRecord.from_entry(entry, source="prop", name=name)
    except PayloadError:
        return
    check_record(record, "prop")
    if name is not None:
        assert record.name == name
    again = ModelRecord.from_entry(record.to_entry(), source="prop")
    assert json.dumps(again.to_entry(), sort_keys=True) == json.dumps(record.to_entry(), sort_keys=True), "an entry survives to_entry"


@PROPS
@given(model_histories())
def test_record_entry_round_trip(history: tuple[str, list[ModelRecord], dict[str, int]]) -> None:
    name, records, _ = history
    for record in records:
        again = ModelRecord.from_entry(json.loads(json.dumps(record.to_entry())), source="file", name=name)
        assert again == record.with_source("file")
        check_record(again, "file")


# -- payloads: anything in, PayloadError or a payload out -------------------------------------------

def parse_or_payload_error(data: object) -> RegistryPayload | None:
    try:
        payload = RegistryPayload.parse(data, "prop")
    except PayloadError:
        return None
    assert isinstance(payload, RegistryPayload)
    return payload


def sections_or_payload_error(payload: RegistryPayload, extra_names: list[str]) -> None:
    assert isinstance(payload.model_names(), list)
    assert payload.timestamp is None or isinstance(payload.timestamp, str)
    assert payload.written_at is None or isinstance(payload.written_at, float)
    for name in [*payload.model_names(), *extra_names]:
        try:
            section = payload.section(name, source="prop")
        except PayloadError:
            continue
        if section is None:
            continue
        assert isinstance(section, ModelSection) and section.name == name
        for record in section.all_records():
            check_record(record, "prop")
        for selector in (Selector.parse(LATEST), Selector.parse(BEST), Selector.parse("1"), Selector.parse("champion")):
            for custom in (False, True):
                picked = section.select(selector, custom_aliases=custom)
                assert picked is None or picked in section.all_records()


@PROPS
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xff\xfe")
@example(b"\x00")
@example(DEEPLY_NESTED.encode())  # RecursionError out of json.loads
@example(HUGE_INT.encode())  # ValueError (int digit limit) out of json.loads
def test_payload_parse_bytes_raises_only_payload_error(raw: bytes) -> None:
    payload = parse_or_payload_error(raw)
    if payload is not None:
        sections_or_payload_error(payload, ["m"])


@PROPS
@given(json_values)
def test_payload_parse_any_json_value_raises_only_payload_error(value: Any) -> None:
    for data in (value, json.dumps(value), json.dumps(value).encode()):
        payload = parse_or_payload_error(data)
        if payload is not None:
            sections_or_payload_error(payload, ["m", ""])


@PROPS
@given(payload_shaped, st.lists(st.text(max_size=4), max_size=2))
@example(json.loads(HUGE_INT_METRIC), [])  # a 401-digit integer metric: float() overflows
def test_payload_sections_raise_only_payload_error(data: dict, names: list[str]) -> None:
    payload = parse_or_payload_error(data)
    if payload is not None:
        sections_or_payload_error(payload, names)
    # the same data as text: what Redis, the training API and the file hand to the parser
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):
        return
    payload = parse_or_payload_error(text)
    if payload is not None:
        sections_or_payload_error(payload, names)


@FEWER
@given(st.text(max_size=200))
@example(DEEPLY_NESTED)
@example(HUGE_INT)
@example(HUGE_INT_METRIC)
def test_payload_parse_text_raises_only_payload_error(text: str) -> None:
    payload = parse_or_payload_error(text)
    if payload is not None:
        sections_or_payload_error(payload, ["m"])


# -- payloads: what a layer writes, the next one reads ---------------------------------------------

@PROPS
@given(model_histories(), st.none() | st.text(min_size=1, max_size=8))
def test_payload_round_trip_keeps_records(history: tuple[str, list[ModelRecord], dict[str, int]], key: Any) -> None:
    name, records, owner = history
    section = ModelSection.from_records(name, records)
    payload = RegistryPayload.empty().with_section(section)
    codec = PayloadCodec(key)
    text = codec.encode(payload)
    for data in (text, text.encode("utf-8")):
        parsed = codec.decode(data, "prop")
        assert parsed.model_names() == [name]
        again = parsed.section(name, source="redis")
        expected = ModelSection.from_records(name, [r.with_source("redis") for r in records])
        assert again == expected
        assert [r.version for r in again.versions] == sorted((r.version for r in records), key=int)
        assert again.latest.version == max((r.version for r in records), key=int)
        assert (again.best.version if again.best else None) == (str(owner[BEST]) if BEST in owner else None)


@PROPS
@given(model_histories(), st.integers(min_value=1, max_value=MAX_VERSION), alias_names)
def test_select_semantics(history: tuple[str, list[ModelRecord], dict[str, int]], probe: int, probe_alias: str) -> None:
    name, records, owner = history
    section = ModelSection.from_records(name, records)
    parsed = RegistryPayload.parse(PayloadCodec().encode(RegistryPayload.empty().with_section(section)), "prop")
    by_version = {r.version: r for r in records}
    for sec, source in ((section, "publisher"), (parsed.section(name, source="file"), "file")):
        for custom in (False, True):
            latest = sec.select(Selector.parse(LATEST), custom_aliases=custom)
            assert latest.version_number == max(int(v) for v in by_version)

            for version in [*by_version, str(probe)]:
                picked = sec.select(Selector.parse(version), custom_aliases=custom)
                if version in by_version:
                    assert picked == by_version[version].with_source(source)
                else:
                    assert picked is None

            best = sec.select(Selector.parse(BEST), custom_aliases=custom)
            if BEST in owner:
                assert best is not None and best.version == str(owner[BEST]) and BEST in best.aliases
            else:
                assert best is None

            for alias in [*owner, probe_alias]:
                if alias == BEST:
                    continue
                picked = sec.select(Selector.parse(alias), custom_aliases=custom)
                if not custom or alias not in owner:
                    assert picked is None, f"custom alias {alias!r} answered with custom_aliases={custom}"
                else:
                    assert picked is not None and picked.version == str(owner[alias]) and alias in picked.aliases


@FEWER
@given(
    st.lists(model_histories(), min_size=1, max_size=3, unique_by=lambda h: h[0]),
    model_histories(),
    st.booleans(),
)
def test_with_section_keeps_other_models_untouched(others: list, replacement: tuple, reuse_name: bool) -> None:
    payload = RegistryPayload.empty()
    for name, records, _ in others:
        payload = payload.with_section(ModelSection.from_records(name, records))
    new_name, new_records, _ = replacement
    if reuse_name:  # replace a model the payload already holds
        new_name = others[0][0]
        new_records = [ModelRecord(**{**r.to_dict(), "aliases": r.aliases, "name": new_name}) for r in new_records]
    before = RegistryPayload.parse(PayloadCodec().encode(payload), "before")
    after = RegistryPayload.parse(PayloadCodec().encode(payload.with_section(ModelSection.from_records(new_name, new_records))), "after")

    assert set(after.model_names()) == set(before.model_names()) | {new_name}
    for name in before.model_names():
        if name == new_name:
            continue
        for key in SECTIONS:
            assert after.raw[key].get(name) == before.raw[key].get(name), (key, name)
        assert after.section(name, source="t") == before.section(name, source="t")
    assert after.section(new_name, source="t") == ModelSection.from_records(new_name, [r.with_source("t") for r in new_records])


@FEWER
@given(payload_shaped, model_histories(name="m"))
def test_with_section_on_arbitrary_payload_keeps_other_entries(data: dict, history: tuple) -> None:
    payload = parse_or_payload_error(data)
    if payload is None:
        return
    name, records, _ = history
    updated = payload.with_section(ModelSection.from_records(name, records))
    for key in SECTIONS:
        old = payload.raw.get(key) or {}
        for other, value in old.items():
            if other != name:
                assert updated.raw[key][other] is value, (key, other)  # kept as it was, not rebuilt
    assert updated.section(name, source="t") == ModelSection.from_records(name, [r.with_source("t") for r in records])


@FEWER
@given(model_histories(name="m"), model_histories(name="m"))
def test_merging_sections_keeps_every_version(newer_history: tuple, older_history: tuple) -> None:
    newer = ModelSection.from_records("m", newer_history[1])
    older = ModelSection.from_records("m", older_history[1])
    merged = newer.merged_with(older)
    assert {r.version for r in merged.versions} == {r.version for r in newer.versions} | {r.version for r in older.versions}
    assert [r.version_number for r in merged.versions] == sorted(r.version_number for r in merged.versions)
    newer_by_version = {r.version: r for r in newer.versions}
    for record in merged.versions:
        if record.version in newer_by_version:
            assert record == newer_by_version[record.version], "the newer entry wins for a version both hold"
    assert merged.latest == merged.versions[-1]
    assert merged.best == (newer.best or older.best)
    # and through the payload, as the cache and the backup merge
    payload = RegistryPayload.empty().with_section(older).merge_section(newer)
    again = RegistryPayload.parse(PayloadCodec().encode(payload), "t").section("m", source="publisher")
    assert [r.version for r in again.versions] == [r.version for r in merged.versions]
