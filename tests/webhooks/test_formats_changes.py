"""Row-change formats (Debezium, Supabase) and the generic JSON format: pure decoding."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.events.model import encode_body, registry
from tests.support import REPO
from webhooks.errors import InvalidPayload, UnsupportedMediaType
from webhooks.events import RowChanged, WebhookReceived
from webhooks.formats import Decoded
from webhooks.formats.changes import decode_debezium, decode_supabase
from webhooks.formats.generic import decode_generic, is_json_media_type

SAMPLES = REPO / "scripts" / "samples"
JSON = "application/json"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def doc(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(sample(name))
    return value


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def row(decoded: Decoded) -> RowChanged:
    assert isinstance(decoded.body, RowChanged)
    return decoded.body


def debezium(value: Any, content_type: str = JSON) -> Decoded:
    return decode_debezium(value if isinstance(value, bytes) else dumps(value), content_type, "cdc")


def debezium_error(value: Any) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as info:
        debezium(value)
    return info.value


def assert_storable(decoded: Decoded) -> None:
    """The event survives the log's own encoding, unchanged."""
    body = decoded.body
    tag = body.__struct_config__.tag
    assert isinstance(tag, str)
    assert registry.decode(tag, 1, encode_body(body), strict=True) == body


def event(
    op: str = "u",
    *,
    table: str = "customers",
    key_id: Any = 7,
    lsn: int = 33000000,
    **source: Any,
) -> dict[str, Any]:
    """A minimal PostgreSQL change event payload (no schema wrapper)."""
    after = None if op == "d" else {"id": key_id, "email": f"{key_id}@example.org"}
    before = {"id": key_id} if op in ("u", "d") else None
    return {
        "before": before,
        "after": after,
        "source": {
            "version": "2.7.3.Final",
            "connector": "postgresql",
            "name": "PostgreSQL_server",
            "ts_ms": 1700000000000,
            "snapshot": "false",
            "db": "postgres",
            "schema": "public",
            "table": table,
            "txId": 900,
            "lsn": lsn,
            "xmin": None,
            **source,
        },
        "op": op,
        "ts_ms": 1700000000100,
        "transaction": None,
    }


# -- Debezium samples ------------------------------------------------------------


def test_postgres_create_with_schema_wrapper() -> None:
    decoded = debezium(sample("changes/debezium-postgres-create.json"))
    change = row(decoded)
    assert change.source == "cdc"
    assert change.provider == "debezium"
    assert change.op == "c"
    assert (change.schema, change.table) == ("public", "customers")
    assert change.key == {"id": 1}
    assert change.before is None
    assert change.after == {
        "id": 1,
        "first_name": "Anne",
        "last_name": "Kretchmar",
        "email": "annek@noanswer.org",
    }
    assert change.source_position == "lsn:24023128;txId:555"
    # source.ts_us (microseconds) is preferred over source.ts_ms.
    assert change.committed_at == datetime(2019, 5, 28, 8, 58, 24, 863123, tzinfo=UTC)
    assert decoded.delivery_id == (
        'PostgreSQL_server:lsn:24023128;txId:555:public.customers:c:{"id":1}'
    )
    assert decoded.partition_key == 'public.customers:{"id":1}'
    assert_storable(decoded)


def test_postgres_update_without_schema_wrapper() -> None:
    decoded = debezium(sample("changes/debezium-postgres-update.json"))
    change = row(decoded)
    assert change.op == "u"
    assert (change.schema, change.table) == ("public", "customers")
    assert change.key == {"id": 1}
    assert change.before == {"id": 1}  # REPLICA IDENTITY DEFAULT: the key columns only
    assert change.after is not None
    assert change.after["first_name"] == "Anne Marie"
    assert change.source_position == "lsn:24023968;txId:556"
    assert change.committed_at == datetime(2019, 5, 28, 8, 58, 30, 21554, tzinfo=UTC)
    assert_storable(decoded)


def test_two_changes_of_one_row_share_a_partition_but_not_a_delivery_id() -> None:
    create = debezium(sample("changes/debezium-postgres-create.json"))
    update = debezium(sample("changes/debezium-postgres-update.json"))
    assert create.partition_key == update.partition_key == 'public.customers:{"id":1}'
    assert create.delivery_id is not None and update.delivery_id is not None
    assert create.delivery_id != update.delivery_id


def test_mysql_delete() -> None:
    decoded = debezium(sample("changes/debezium-mysql-delete.json"))
    change = row(decoded)
    assert change.op == "d"
    # MySQL has no schemas: the database stands in for one.
    assert (change.schema, change.table) == ("inventory", "customers")
    assert change.key == {"id": 1004}  # from before: a delete has no after
    assert change.after is None
    assert change.before is not None and change.before["email"] == "annek@noanswer.org"
    assert change.source_position == "file:mysql-bin.000003;pos:805;row:0"
    assert change.committed_at == datetime(2016, 6, 10, 17, 50, 29, tzinfo=UTC)
    assert decoded.delivery_id == (
        'mysql-server-1:file:mysql-bin.000003;pos:805;row:0:inventory.customers:d:{"id":1004}'
    )
    assert decoded.partition_key == 'inventory.customers:{"id":1004}'
    assert_storable(decoded)


@pytest.mark.parametrize(
    "name",
    [
        "changes/debezium-postgres-create.json",
        "changes/debezium-postgres-update.json",
        "changes/debezium-mysql-delete.json",
    ],
)
def test_a_redelivery_has_the_same_delivery_id(name: str) -> None:
    original = sample(name)
    again = debezium(original)
    assert debezium(original) == again
    # Re-emitted after a connector restart: other bytes, another processing
    # time (payload.ts_ms), the same change.
    value = doc(name)
    payload = value.get("payload", value)
    payload["ts_ms"] += 5000
    reemitted = json.dumps(value, indent=4, sort_keys=True).encode()
    assert reemitted != original
    assert debezium(reemitted).delivery_id == again.delivery_id
    assert debezium(reemitted).partition_key == again.partition_key


def test_wrapped_and_bare_events_decode_alike() -> None:
    wrapped = doc("changes/debezium-postgres-create.json")
    bare = debezium(wrapped["payload"])
    assert debezium(wrapped) == bare
    update = doc("changes/debezium-postgres-update.json")
    assert debezium({"schema": {"type": "struct"}, "payload": update}) == debezium(update)


def test_rows_of_one_mysql_binlog_event_differ_by_row() -> None:
    first = doc("changes/debezium-mysql-delete.json")
    second = json.loads(json.dumps(first))
    second["source"]["row"] = 1
    second["before"]["id"] = 1005
    a, b = debezium(first), debezium(second)
    assert row(b).source_position == "file:mysql-bin.000003;pos:805;row:1"
    assert a.delivery_id != b.delivery_id
    assert a.partition_key != b.partition_key


def test_snapshot_reads_sharing_a_position_differ_by_key() -> None:
    one = debezium(event("r", key_id=1, snapshot="true"))
    two = debezium(event("r", key_id=2, snapshot="true"))
    assert row(one).op == row(two).op == "r"
    assert row(one).source_position == row(two).source_position
    assert one.delivery_id != two.delivery_id


def test_keyless_rows_differ_by_content() -> None:
    first = event("r")
    second = event("r")
    first["after"] = {"note": "first"}
    second["after"] = {"note": "second"}
    a, b = debezium(first), debezium(second)
    assert row(a).key == row(b).key == {}
    assert a.partition_key == b.partition_key == "public.customers:{}"
    assert a.delivery_id is not None and b.delivery_id is not None
    assert a.delivery_id != b.delivery_id
    assert debezium(first).delivery_id == a.delivery_id


def test_a_primary_key_change_is_a_delete_and_a_create_at_one_position() -> None:
    delete = debezium(event("d", key_id=1))
    create = debezium(event("c", key_id=2))
    assert row(delete).source_position == row(create).source_position
    assert delete.delivery_id != create.delivery_id
    assert delete.partition_key == 'public.customers:{"id":1}'
    assert create.partition_key == 'public.customers:{"id":2}'


def test_the_envelope_key_wins_over_the_id_column() -> None:
    value = event("u", key_id=7)
    value["after"]["order_id"] = 40
    composite = {"order_id": 40, "line_no": 3}
    plain = debezium({"key": composite, "value": value})
    assert row(plain).key == composite
    assert plain.partition_key == 'public.customers:{"line_no":3,"order_id":40}'
    # The key as the JSON converter wraps it, and the value wrapped too.
    wrapped = debezium(
        {
            "key": {"schema": {"type": "struct"}, "payload": composite},
            "value": {"schema": {"type": "struct"}, "payload": value},
        }
    )
    assert wrapped == plain
    # A null key (a table without a primary key) falls back to the row.
    assert row(debezium({"key": None, "value": value})).key == {"id": 7}


def test_a_long_key_is_digested() -> None:
    long_id = "x" * 500
    decoded = debezium(event("c", key_id=long_id))
    assert row(decoded).key == {"id": long_id}
    assert decoded.partition_key.startswith("public.customers:sha256:")
    assert len(decoded.partition_key) < 100
    assert decoded.partition_key == debezium(event("u", key_id=long_id)).partition_key
    assert decoded.partition_key != debezium(event("u", key_id=long_id + "y")).partition_key


def test_mongodb_document_as_extended_json_string() -> None:
    value = {
        "after": '{"_id": {"$oid": "596e275826f08b2730779e1f"}, "name": "Anne", "qty": 4}',
        "source": {
            "version": "2.7.3.Final",
            "connector": "mongodb",
            "name": "fulfillment",
            "ts_ms": 1558965508000,
            "snapshot": "false",
            "db": "inventory",
            "rs": "rs0",
            "collection": "orders",
            "ord": 31,
        },
        "op": "c",
        "ts_ms": 1558965515240,
    }
    decoded = debezium(value)
    change = row(decoded)
    assert (change.schema, change.table) == ("inventory", "orders")
    assert change.after == {"_id": {"$oid": "596e275826f08b2730779e1f"}, "name": "Anne", "qty": 4}
    assert change.key == {"_id": {"$oid": "596e275826f08b2730779e1f"}}
    assert change.source_position == "ts_ms:1558965508000;ord:31"
    assert_storable(decoded)


def test_source_fields_left_unread_may_take_any_type() -> None:
    value = event("c")
    value["source"].update(
        snapshot=True, sequence=None, xmin="x", gtid=5, thread=[1], query={"q": 1}
    )
    value["transaction"] = {"id": 1}
    value["ts_ms"] = "processing time, unread"
    assert row(debezium(value)).source_position == "lsn:33000000;txId:900"


def test_no_position_means_no_delivery_id() -> None:
    value = event("c")
    for field in ("lsn", "txId", "ts_ms"):
        del value["source"][field]
    decoded = debezium(value)
    assert row(decoded).source_position is None
    assert row(decoded).committed_at is None
    assert decoded.delivery_id is None
    assert decoded.partition_key == 'public.customers:{"id":7}'


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/vnd.debezium+json"],
)
def test_debezium_media_types(content_type: str) -> None:
    assert row(debezium(event("c"), content_type)).op == "c"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/cloudevents+json", "avro/bytes", ""]
)
def test_debezium_refuses_other_media_types(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        debezium(event("c"), content_type)
    assert info.value.status == 415
    assert "application/json" in info.value.message


# -- Debezium errors ---------------------------------------------------------------


def test_invalid_op_names_payload_op() -> None:
    wrapped = doc("changes/debezium-postgres-create.json")
    wrapped["payload"]["op"] = "x"
    error = debezium_error(wrapped)
    assert error.status == 422
    assert error.field == "payload.op"
    assert "'x'" in error.message and "c, u, d or r" in error.message


def test_invalid_op_in_a_bare_event_names_op() -> None:
    value = event("c")
    value["op"] = 3
    assert debezium_error(value).field == "op"


def test_missing_op_names_it() -> None:
    value = event("c")
    del value["op"]
    error = debezium_error({"schema": {}, "payload": value})
    assert error.field == "payload.op"
    assert "missing" in error.message


@pytest.mark.parametrize(("op", "word"), [("t", "truncate"), ("m", "message")])
def test_truncate_and_message_events_are_refused(op: str, word: str) -> None:
    value = event("c")
    value["op"] = op
    value["before"] = value["after"] = None
    error = debezium_error({"schema": {}, "payload": value})
    assert error.field == "payload.op"
    assert word in error.message


def test_missing_table() -> None:
    value = event("c")
    del value["source"]["table"]
    error = debezium_error({"schema": {}, "payload": value})
    assert error.field == "payload.source.table"
    value["source"]["table"] = ""
    assert debezium_error(value).field == "source.table"


def test_missing_source() -> None:
    value = event("c")
    del value["source"]
    assert debezium_error(value).field == "source"


def test_a_wrongly_typed_source_field_is_named() -> None:
    value = event("c")
    value["source"]["pos"] = "805"
    error = debezium_error({"schema": {}, "payload": value})
    assert error.field == "payload.source.pos"
    assert "int" in error.message


def test_a_create_without_a_row() -> None:
    value = event("c")
    value["after"] = None
    assert debezium_error(value).field == "after"


def test_a_row_that_is_not_an_object() -> None:
    value = event("c")
    value["after"] = [1, 2]
    assert debezium_error(value).field == "after"
    value["after"] = "not json"
    assert debezium_error(value).field == "after"


@pytest.mark.parametrize("body", [b"", b"null", b"  \n", b" null\n"])
def test_tombstone_body(body: bytes) -> None:
    error = debezium_error(body)
    assert error.status == 422
    assert error.field is None
    assert "tombstone" in error.message


def test_schema_wrapper_with_a_null_payload() -> None:
    error = debezium_error({"schema": None, "payload": None})
    assert error.field == "payload"
    assert "tombstone" in error.message


def test_key_value_envelope_with_a_null_value() -> None:
    error = debezium_error({"key": {"id": 1}, "value": None})
    assert error.field == "value"
    assert "tombstone" in error.message


def test_an_envelope_key_that_is_not_an_object() -> None:
    assert debezium_error({"key": 42, "value": event("c")}).field == "key"


def test_malformed_json() -> None:
    error = debezium_error(b'{"op": "c", "source": {')
    assert error.field is None
    assert "not valid JSON" in error.message
    error = debezium_error(b'{"op": c}')
    assert "byte 7" in error.message


def test_a_body_that_is_not_an_object() -> None:
    error = debezium_error(b"[1, 2]")
    assert error.field is None
    assert "object" in error.message


def test_transaction_metadata_is_refused() -> None:
    begin = {"status": "BEGIN", "id": "571:53195829", "ts_ms": 1486500577125}
    error = debezium_error(begin)
    assert "transaction metadata" in error.message
    assert error.field == "op"


def test_schema_change_events_are_refused() -> None:
    change = {
        "source": {"connector": "mysql", "db": "inventory", "table": "customers"},
        "databaseName": "inventory",
        "ddl": "ALTER TABLE customers ADD middle_name varchar(255) AFTER first_name",
    }
    error = debezium_error({"schema": {}, "payload": change})
    assert "schema change" in error.message
    assert error.field == "payload.op"


def test_an_unusable_timestamp() -> None:
    value = event("c", ts_ms=10**20)
    error = debezium_error(value)
    assert error.field == "source.ts_ms"


# -- Supabase ---------------------------------------------------------------------


def supabase(value: Any, content_type: str = JSON) -> Decoded:
    return decode_supabase(value if isinstance(value, bytes) else dumps(value), content_type, "sb")


def supabase_error(value: Any) -> InvalidPayload:
    with pytest.raises(InvalidPayload) as info:
        supabase(value)
    return info.value


PROFILE_ID = "8d0fd2b3-9ca6-4c2e-a4c5-55bf5a2b3e4a"


def test_supabase_insert() -> None:
    decoded = supabase(sample("changes/supabase-insert.json"))
    change = row(decoded)
    assert change.source == "sb"
    assert change.provider == "supabase"
    assert change.op == "c"
    assert (change.schema, change.table) == ("public", "profiles")
    assert change.key == {"id": PROFILE_ID}
    assert change.before is None
    assert change.after is not None and change.after["full_name"] == "Anne Kretchmar"
    assert change.source_position is None
    assert change.committed_at is None
    assert decoded.delivery_id is None
    assert decoded.partition_key == f'public.profiles:{{"id":"{PROFILE_ID}"}}'
    assert_storable(decoded)


def test_supabase_update() -> None:
    decoded = supabase(sample("changes/supabase-update.json"), "application/json; charset=utf-8")
    change = row(decoded)
    assert change.op == "u"
    assert change.key == {"id": PROFILE_ID}
    assert change.before is not None and change.before["full_name"] == "Anne Kretchmar"
    assert change.after is not None and change.after["full_name"] == "Anne Marie Kretchmar"
    assert decoded.delivery_id is None
    insert = supabase(sample("changes/supabase-insert.json"))
    assert decoded.partition_key == insert.partition_key


def test_supabase_delete() -> None:
    value = doc("changes/supabase-update.json")
    value.update(type="DELETE", old_record=value["record"], record=None)
    decoded = supabase(value)
    change = row(decoded)
    assert change.op == "d"
    assert change.key == {"id": PROFILE_ID}
    assert change.after is None
    assert change.before is not None and change.before["username"] == "anne"
    assert decoded.partition_key == supabase(sample("changes/supabase-insert.json")).partition_key


def test_supabase_without_an_id_column() -> None:
    value = {"type": "INSERT", "table": "tags", "schema": "public", "record": {"name": "x"}}
    decoded = supabase(value)
    assert row(decoded).key == {}
    assert decoded.partition_key == "public.tags:{}"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "TRUNCATE"}, "type"),
        ({"type": "insert"}, "type"),
        ({"table": None}, "table"),
        ({"table": ""}, "table"),
        ({"record": None}, "record"),
        ({"record": [1]}, "record"),
        ({"type": "DELETE", "old_record": None}, "old_record"),
        ({"schema": 5}, "schema"),
    ],
)
def test_supabase_errors(change: dict[str, Any], field: str) -> None:
    value = doc("changes/supabase-insert.json")
    value.update(change)
    if change.get("table", "") is None:
        del value["table"]
    error = supabase_error(value)
    assert error.status == 422
    assert error.field == field


def test_supabase_malformed_and_media_type() -> None:
    error = supabase_error(b'{"type": "INSERT",')
    assert error.field is None and "not valid JSON" in error.message
    with pytest.raises(UnsupportedMediaType):
        supabase(sample("changes/supabase-insert.json"), "application/x-www-form-urlencoded")


# -- generic ------------------------------------------------------------------------


def test_generic_order() -> None:
    raw = sample("generic/order.json")
    decoded = decode_generic(raw, JSON, "shop")
    assert isinstance(decoded.body, WebhookReceived)
    assert decoded.body.source == "shop"
    assert decoded.body.payload == json.loads(raw)
    assert decoded.body.payload["data"]["shipping_address"]["line1"] == "Hauptstraße 5"
    assert decoded.delivery_id is None
    assert decoded.partition_key == ""
    assert_storable(decoded)


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/cloudevents+json", True),
        ("application/vnd.api+json; charset=UTF-8", True),
        ("APPLICATION/LD+JSON", True),
        ("text/plain", False),
        ("application/xml", False),
        ("application/+json", False),
        ("+json", False),
        ("application/jsonx", False),
        ("", False),
    ],
)
def test_generic_media_types(content_type: str, accepted: bool) -> None:
    assert is_json_media_type(content_type) is accepted
    if accepted:
        assert decode_generic(b"[1, 2]", content_type, "g").body == WebhookReceived(
            source="g", payload=[1, 2]
        )
    else:
        with pytest.raises(UnsupportedMediaType):
            decode_generic(b"[1, 2]", content_type, "g")


@pytest.mark.parametrize("value", [b"42", b'"text"', b"null", b"true", b"[]", b"{}"])
def test_generic_takes_any_json_value(value: bytes) -> None:
    decoded = decode_generic(value, JSON, "g")
    assert isinstance(decoded.body, WebhookReceived)
    assert decoded.body.payload == json.loads(value)


@pytest.mark.parametrize(("body", "where"), [(b'{"a": 1,}', "byte 8"), (b"", "truncated")])
def test_generic_malformed_json(body: bytes, where: str) -> None:
    with pytest.raises(InvalidPayload) as info:
        decode_generic(body, JSON, "g")
    assert info.value.status == 422
    assert "not valid JSON" in info.value.message
    assert where in info.value.message


@pytest.mark.parametrize(
    ("decode", "content_type"),
    [(decode_debezium, JSON), (decode_supabase, JSON), (decode_generic, JSON)],
)
def test_deeply_nested_json_is_invalid_not_a_crash(decode: Any, content_type: str) -> None:
    depth = 200_000
    for body in (b"[" * depth + b"]" * depth, b'{"after": ' + b"[" * depth + b"]" * depth + b"}"):
        with pytest.raises(InvalidPayload):
            decode(body, content_type, "s")


# -- properties ----------------------------------------------------------------------

DECODERS = [decode_debezium, decode_supabase, decode_generic]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def check(decode: Any, body: bytes, content_type: str) -> None:
    """Either a storable event or one of the two ingress errors: nothing else."""
    try:
        decoded = decode(body, content_type, "s")
    except (InvalidPayload, UnsupportedMediaType) as exc:
        assert exc.status in (415, 422)
        return
    assert isinstance(decoded, Decoded)
    assert isinstance(decoded.partition_key, str)
    encode_body(decoded.body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    decode=st.sampled_from(DECODERS),
    body=st.binary(max_size=256),
    content_type=st.sampled_from([JSON, "application/vnd.debezium+json", "text/plain"])
    | st.text(max_size=40),
)
def test_arbitrary_bytes_only_raise_ingress_errors(
    decode: Any, body: bytes, content_type: str
) -> None:
    check(decode, body, content_type)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(decode=st.sampled_from(DECODERS), value=json_values)
def test_arbitrary_json_only_raise_ingress_errors(decode: Any, value: Any) -> None:
    check(decode, json.dumps(value).encode(), JSON)


SOURCE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "name": st.text(max_size=8),
    "connector": st.sampled_from(["postgresql", "mysql", "mongodb", "sqlserver"]),
    "ts_ms": st.integers(),
    "ts_us": st.integers(),
    "snapshot": st.sampled_from(["true", "false", "last", True, False]),
    "db": st.text(max_size=8),
    "schema": st.text(max_size=8),
    "collection": st.text(max_size=8),
    "txId": st.integers() | st.text(max_size=8),
    "lsn": st.integers(min_value=0),
    "file": st.text(max_size=8),
    "pos": st.integers(min_value=0),
    "row": st.integers(min_value=0),
    "ord": st.integers(min_value=0),
    "change_lsn": st.text(max_size=8),
}
plausible_source = st.fixed_dictionaries({"table": st.text(max_size=8)}, optional=SOURCE_FIELDS)
rows = st.none() | st.dictionaries(st.sampled_from(["id", "_id", "name"]), json_values)
plausible_payload = st.fixed_dictionaries(
    {"op": st.sampled_from(["c", "u", "d", "r", "t", "m"]), "source": plausible_source},
    optional={
        "before": rows,
        "after": rows | rows.map(json.dumps),
        "ts_ms": st.integers(),
        "transaction": st.none()
        | st.fixed_dictionaries({"id": st.text(), "total_order": st.integers()}),
    },
)
#: One place to put an arbitrary JSON value into an otherwise plausible event.
CORRUPTIBLE = [
    ("op",),
    ("source",),
    ("before",),
    ("after",),
    ("ts_ms",),
    ("transaction",),
    *(("source", name) for name in ["table", *SOURCE_FIELDS]),
]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=plausible_payload,
    corruption=st.none() | st.tuples(st.sampled_from(CORRUPTIBLE), json_values),
    shape=st.sampled_from(["bare", "wrapped", "key-value"]),
    key=st.none() | st.dictionaries(st.text(max_size=4), json_values) | json_values,
)
def test_debezium_shaped_json_decodes_or_raises_invalid_payload(
    payload: dict[str, Any],
    corruption: tuple[tuple[str, ...], Any] | None,
    shape: str,
    key: Any,
) -> None:
    if corruption is not None:
        path, junk = corruption
        target = payload
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = junk
    value: Any = payload
    if shape == "wrapped":
        value = {"schema": {"type": "struct"}, "payload": payload}
    elif shape == "key-value":
        value = {"key": key, "value": payload}
    try:
        decoded = debezium(value)
    except InvalidPayload as exc:
        assert exc.status == 422
        return
    change = row(decoded)
    assert change.op in ("c", "u", "d", "r")
    assert change.table
    assert decoded.partition_key.startswith(
        f"{change.schema}.{change.table}:" if change.schema else f"{change.table}:"
    )
    if change.source_position is None:
        assert decoded.delivery_id is None
    else:
        assert decoded.delivery_id is not None
        assert change.source_position in decoded.delivery_id
    assert debezium(value) == decoded  # deterministic, so a redelivery dedupes
    assert_storable(decoded)
