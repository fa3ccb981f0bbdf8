"""The Protobuf format: parsing (text and Confluent's base64 descriptors), references, Confluent's rules."""

from __future__ import annotations

import pytest
from confluent_kafka.schema_registry.common.protobuf import _schema_to_str
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

from pigeon.registry.errors import InvalidSchemaError
from pigeon.registry.formats.protobuf import FORMAT


def proto(body: str, syntax: str = "proto3", package: str = "shop") -> str:
    header = f'syntax = "{syntax}";\n' + (f"package {package};\n" if package else "")
    return header + body


def problems(reader: str, writer: str, references: dict[str, str] | None = None) -> list[str]:
    """The incompatibilities as "KIND #/path", the way Confluent's test suites spell them."""
    refs = references or {}
    found = FORMAT.incompatibilities(FORMAT.parse(reader, refs), FORMAT.parse(writer, refs))
    return sorted(message.split(":")[0].replace(" at ", " ") for message in found)


def message(fields: str, name: str = "Order", syntax: str = "proto3") -> str:
    return proto(f"message {name} {{\n{fields}\n}}\n", syntax)


# (old, new, what BACKWARD finds: reader=new/writer=old, what FORWARD finds: reader=old/writer=new)
CASES = {
    "package changed": (
        proto("message A { int32 a = 1; }"),
        proto("message A { int32 a = 1; }", package="store"),
        ["PACKAGE_CHANGED #/"],
        ["PACKAGE_CHANGED #/"],
    ),
    "message removed": (
        proto("message A { int32 a = 1; }\nmessage B { int32 b = 1; }"),
        proto("message A { int32 a = 1; }"),
        ["MESSAGE_REMOVED #/B"],
        [],
    ),
    "nested message removed": (
        proto("message A { message B { int32 b = 1; } int32 a = 1; }"),
        proto("message A { int32 a = 1; }"),
        ["MESSAGE_REMOVED #/A/B"],
        [],
    ),
    "messages reordered": (
        proto("message A { int32 a = 1; }\nmessage B { int32 b = 1; }"),
        proto("message B { int32 b = 1; }\nmessage A { int32 a = 1; }"),
        [],
        [],
    ),
    "int32 widened to int64": (message("int32 a = 1;"), message("int64 a = 1;"), [], []),
    "uint64 to bool": (message("uint64 a = 1;"), message("bool a = 1;"), [], []),
    "string to bytes": (message("string a = 1;"), message("bytes a = 1;"), [], []),
    "fixed32 to sfixed32": (message("fixed32 a = 1;"), message("sfixed32 a = 1;"), [], []),
    "sint32 to sint64": (message("sint32 a = 1;"), message("sint64 a = 1;"), [], []),
    "int32 to sint32": (
        message("int32 a = 1;"),
        message("sint32 a = 1;"),
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
    ),
    "fixed32 to fixed64": (
        message("fixed32 a = 1;"),
        message("fixed64 a = 1;"),
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
    ),
    "float to double": (
        message("float a = 1;"),
        message("double a = 1;"),
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
    ),
    "int32 to string": (
        message("int32 a = 1;"),
        message("string a = 1;"),
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
    ),
    "int32 to an enum": (
        message("int32 a = 1;"),
        proto("message Order { Status a = 1; }\nenum Status { NEW = 0; PAID = 1; }"),
        [],
        [],
    ),
    "scalar to message": (
        proto("message Order { int32 a = 1; }\nmessage Money { int64 cents = 1; }"),
        proto("message Order { Money a = 1; }\nmessage Money { int64 cents = 1; }"),
        ["FIELD_KIND_CHANGED #/Order/1"],
        ["FIELD_KIND_CHANGED #/Order/1"],
    ),
    "message type replaced": (
        proto("message Order { A a = 1; }\nmessage A { int32 x = 1; }\nmessage B { int32 x = 1; }"),
        proto("message Order { B a = 1; }\nmessage A { int32 x = 1; }\nmessage B { int32 x = 1; }"),
        ["FIELD_NAMED_TYPE_CHANGED #/Order/1"],
        ["FIELD_NAMED_TYPE_CHANGED #/Order/1"],
    ),
    "same type spelled fully qualified": (
        proto("message Order { A a = 1; }\nmessage A { int32 x = 1; }"),
        proto("message Order { .shop.A a = 1; }\nmessage A { int32 x = 1; }"),
        [],
        [],
    ),
    "map value type changed": (
        message("map<string, int32> a = 1;"),
        message("map<string, string> a = 1;"),
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
        ["FIELD_SCALAR_KIND_CHANGED #/Order/1"],
    ),
    "map to a scalar": (
        message("map<string, int32> a = 1;"),
        message("int32 a = 1;"),
        ["FIELD_KIND_CHANGED #/Order/1"],
        ["FIELD_KIND_CHANGED #/Order/1"],
    ),
    "proto2 number made repeated": (
        message("optional int32 a = 1;", syntax="proto2"),
        message("repeated int32 a = 1;", syntax="proto2"),
        ["FIELD_NUMERIC_LABEL_CHANGED #/Order/1"],
        ["FIELD_NUMERIC_LABEL_CHANGED #/Order/1"],
    ),
    "proto2 string made repeated": (
        message("optional string a = 1;", syntax="proto2"),
        message("repeated string a = 1;", syntax="proto2"),
        [],
        [],
    ),
    "required field added": (
        message("optional int32 a = 1;", syntax="proto2"),
        message("optional int32 a = 1;\nrequired int32 b = 2;", syntax="proto2"),
        ["REQUIRED_FIELD_ADDED #/Order/2"],
        ["REQUIRED_FIELD_REMOVED #/Order/2"],
    ),
    "optional field added": (message("int32 a = 1;"), message("int32 a = 1;\nstring b = 2;"), [], []),
    "field renamed": (message("int32 a = 1;"), message("int32 amount = 1;"), [], []),
    "field renumbered": (message("int32 a = 1;"), message("int32 a = 2;"), [], []),
    "oneof member removed": (
        message("oneof pay { string card = 1; string iban = 2; }"),
        message("oneof pay { string card = 1; }"),
        ["ONEOF_FIELD_REMOVED #/Order/pay/2"],
        [],
    ),
    "whole oneof removed": (
        message("int32 a = 1;\noneof pay { string card = 2; }"),
        message("int32 a = 1;"),
        [],
        [],
    ),
    "fields moved into a new oneof": (
        message("string card = 1;\nstring iban = 2;"),
        message("oneof pay { string card = 1; string iban = 2; }"),
        ["MULTIPLE_FIELDS_MOVED_TO_ONEOF #/Order/pay"],
        [],
    ),
    "field moved into an existing oneof": (
        message("string iban = 2;\noneof pay { string card = 1; }"),
        message("oneof pay { string card = 1; string iban = 2; }"),
        ["FIELD_MOVED_TO_EXISTING_ONEOF #/Order/pay"],
        [],
    ),
    "single field moved into a new oneof": (
        message("string card = 1;"),
        message("oneof pay { string card = 1; }"),
        [],
        [],
    ),
    "field type changed inside a oneof": (
        message("oneof pay { string card = 1; }"),
        message("oneof pay { int64 card = 1; }"),
        ["FIELD_SCALAR_KIND_CHANGED #/Order/pay/1"],
        ["FIELD_SCALAR_KIND_CHANGED #/Order/pay/1"],
    ),
    "enum values added and removed": (
        proto("message Order { Status s = 1; }\nenum Status { NEW = 0; PAID = 1; }"),
        proto("message Order { Status s = 1; }\nenum Status { NEW = 0; SHIPPED = 2; }"),
        [],
        [],
    ),
    # Confluent has no rule on the syntax itself: proto2 and proto3 share the wire format.
    "proto2 to proto3": (message("optional int32 a = 1;", syntax="proto2"), message("int32 a = 1;"), [], []),
}


@pytest.mark.parametrize(("old", "new", "backward", "forward"), CASES.values(), ids=CASES.keys())
def test_rules_both_directions(old: str, new: str, backward: list[str], forward: list[str]) -> None:
    assert problems(reader=new, writer=old) == sorted(backward)
    assert problems(reader=old, writer=new) == sorted(forward)


def test_messages_say_where_and_why() -> None:
    [text] = FORMAT.incompatibilities(
        FORMAT.parse(message("string total = 1;"), {}), FORMAT.parse(message("int32 total = 1;"), {})
    )
    assert text.startswith("FIELD_SCALAR_KIND_CHANGED at #/Order/1: ")
    assert "'total'" in text and "int32" in text and "string" in text


def test_recursive_messages_terminate() -> None:
    tree = proto("message Node { int32 value = 1; repeated Node children = 2; }")
    assert problems(tree, tree) == []
    changed = proto("message Node { string value = 1; repeated Node children = 2; }")
    assert problems(changed, tree) == ["FIELD_SCALAR_KIND_CHANGED #/Node/1"]


COMMON = proto("message Money { int64 cents = 1; }", package="common")
ORDER_USING_COMMON = proto('import "common.proto";\nmessage Order { .common.Money total = 1; }')


def test_imports_resolve_through_references() -> None:
    assert problems(ORDER_USING_COMMON, ORDER_USING_COMMON, {"common.proto": COMMON}) == []


def test_a_change_in_a_referenced_file_is_found() -> None:
    before = FORMAT.parse(ORDER_USING_COMMON, {"common.proto": COMMON})
    changed = proto("message Money { string cents = 1; }", package="common")
    after = FORMAT.parse(ORDER_USING_COMMON, {"common.proto": changed})
    found = [text.split(":")[0] for text in FORMAT.incompatibilities(after, before)]
    assert found == ["FIELD_SCALAR_KIND_CHANGED at #/Money/1", "FIELD_NAMED_TYPE_CHANGED at #/Order/1"]


def test_transitive_imports() -> None:
    middle = proto('import "common.proto";\nmessage Price { .common.Money amount = 1; }', package="prices")
    order = proto('import "price.proto";\nmessage Order { .prices.Price price = 1; }')
    refs = {"price.proto": middle, "common.proto": COMMON}
    assert problems(order, order, refs) == []


def test_well_known_types_need_no_reference() -> None:
    with_timestamp = proto(
        'import "google/protobuf/timestamp.proto";\nmessage Order { google.protobuf.Timestamp at = 1; }'
    )
    with_duration = proto(
        'import "google/protobuf/duration.proto";\nmessage Order { google.protobuf.Duration at = 1; }'
    )
    assert problems(with_duration, with_timestamp) == ["FIELD_NAMED_TYPE_CHANGED #/Order/1"]


def test_builtin_files_this_process_lacks_are_taken_by_type_name() -> None:
    dated = proto('import "google/type/date.proto";\nmessage Order { google.type.Date on = 1; }')
    timed = proto('import "google/type/timeofday.proto";\nmessage Order { google.type.TimeOfDay on = 1; }')
    assert problems(dated, dated) == []
    assert problems(timed, dated) == ["FIELD_NAMED_TYPE_CHANGED #/Order/1"]


INVALID = {
    "syntax error": ("syntax = 'proto3'; message A { int32 a = 1 }", "line 1"),
    "unknown type": (message("Money total = 1;"), "uses type 'Money'"),
    "import without a reference": (
        proto('import "money.proto";\nmessage A { int32 a = 1; }'),
        "'money.proto'",
    ),
    "field number used twice": (message("int32 a = 1;\nint32 b = 1;"), "field number 1 twice"),
    "required in proto3": (message("required int32 a = 1;"), "proto3 has no required fields"),
    "unknown syntax": ('syntax = "proto4";', "'proto4'"),
    "editions": ('edition = "2023";', "editions are not supported"),
    "neither text nor a descriptor": ("bm90IGEgZGVzY3JpcHRvcg", "base64 FileDescriptorProto"),
}


@pytest.mark.parametrize(("text", "expected"), INVALID.values(), ids=INVALID.keys())
def test_invalid_schemas_are_refused_with_a_reason(text: str, expected: str) -> None:
    with pytest.raises(InvalidSchemaError, match="invalid Protobuf") as raised:
        FORMAT.parse(text, {})
    assert expected in str(raised.value)
    assert raised.value.error_code == 42201


def test_an_invalid_reference_is_named() -> None:
    with pytest.raises(InvalidSchemaError, match=r"referenced schema 'common\.proto'"):
        FORMAT.parse(ORDER_USING_COMMON, {"common.proto": "message Money {"})


def test_canonical_form_ignores_formatting_and_comments() -> None:
    compact = FORMAT.parse(proto("message A { int32 a = 1; }"), {})
    spaced = FORMAT.parse(
        'syntax="proto3";\n\npackage   shop;\n// money\nmessage A {\n  int32 a = 1; // amount\n}\n', {}
    )
    assert FORMAT.canonical(compact) == FORMAT.canonical(spaced)
    assert FORMAT.canonical(FORMAT.parse(FORMAT.canonical(spaced), {})) == FORMAT.canonical(spaced)
    assert FORMAT.canonical(FORMAT.parse(proto("message A { int64 a = 1; }"), {})) != FORMAT.canonical(
        compact
    )


def _generated_order_file() -> descriptor_pb2.FileDescriptorProto:
    """The descriptor protoc would produce for ORDER_SOURCE (what a generated _pb2 module carries)."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="shop/order.proto",
        package="shop",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    order = file.message_type.add(name="Order")
    order.field.add(name="id", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    order.field.add(
        name="at",
        number=2,
        type=f.TYPE_MESSAGE,
        type_name=".google.protobuf.Timestamp",
        label=f.LABEL_OPTIONAL,
    )
    order.field.add(
        name="lines", number=3, type=f.TYPE_MESSAGE, type_name=".shop.Order.Line", label=f.LABEL_REPEATED
    )
    order.field.add(
        name="tags", number=4, type=f.TYPE_MESSAGE, type_name=".shop.Order.TagsEntry", label=f.LABEL_REPEATED
    )
    order.field.add(name="card", number=5, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL, oneof_index=0)
    order.field.add(name="iban", number=6, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL, oneof_index=0)
    order.field.add(
        name="note", number=7, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL, oneof_index=1, proto3_optional=True
    )
    order.field.add(
        name="status", number=8, type=f.TYPE_ENUM, type_name=".shop.Order.Status", label=f.LABEL_OPTIONAL
    )
    order.oneof_decl.add(name="payment")
    order.oneof_decl.add(name="_note")
    line = order.nested_type.add(name="Line")
    line.field.add(name="sku", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    line.field.add(name="quantity", number=2, type=f.TYPE_UINT32, label=f.LABEL_OPTIONAL)
    tags = order.nested_type.add(name="TagsEntry")
    tags.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    tags.field.add(name="value", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    tags.options.map_entry = True
    status = order.enum_type.add(name="Status")
    status.value.add(name="NEW", number=0)
    status.value.add(name="PAID", number=1)
    order.reserved_range.add(start=9, end=12)
    order.reserved_name.append("total")
    return file


ORDER_SOURCE = proto(
    'import "google/protobuf/timestamp.proto";\n'
    "message Order {\n"
    "  string id = 1;\n"
    "  google.protobuf.Timestamp at = 2;\n"
    "  repeated Line lines = 3;\n"
    "  map<string, string> tags = 4;\n"
    "  oneof payment { string card = 5; string iban = 6; }\n"
    "  optional string note = 7;\n"
    "  Status status = 8;\n"
    "  message Line { string sku = 1; uint32 quantity = 2; }\n"
    "  enum Status { NEW = 0; PAID = 1; }\n"
    "  reserved 9 to 11;\n"
    '  reserved "total";\n'
    "}\n"
)


def test_what_confluents_protobuf_serializer_registers_parses() -> None:
    # The serializer registers _schema_to_str(message.DESCRIPTOR.file): the file's descriptor in base64.
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(_generated_order_file())
    generated = message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Order"))
    registered = _schema_to_str(generated.DESCRIPTOR.file)

    parsed = FORMAT.parse(registered, {})
    order = parsed.messages["Order"]
    assert {number: (f.name, f.label, f.type.kind, f.oneof) for number, f in order.fields.items()} == {
        1: ("id", None, "scalar", None),
        2: ("at", None, "message", None),
        3: ("lines", "repeated", "message", None),
        4: ("tags", None, "map", None),
        5: ("card", None, "scalar", "payment"),
        6: ("iban", None, "scalar", "payment"),
        7: ("note", "optional", "scalar", None),
        8: ("status", None, "enum", None),
    }
    from_source = FORMAT.parse(ORDER_SOURCE, {})
    assert FORMAT.incompatibilities(parsed, from_source) == []
    assert FORMAT.incompatibilities(from_source, parsed) == []
    assert FORMAT.canonical(FORMAT.parse(FORMAT.canonical(parsed), {})) == FORMAT.canonical(parsed)


def test_type_name() -> None:
    assert FORMAT.type_name == "PROTOBUF"
