"""Which messages an agent takes, by the media types its card lists (`defaultInputModes`)."""

from __future__ import annotations

import pytest
from a2a.types import Message, Part, Role
from a2a.utils.errors import ContentTypeNotSupportedError, InvalidParamsError
from google.protobuf import struct_pb2

from node.a2a.handler import accepts, check_parts, part_media_type

TEXT_ONLY = ("text/plain",)


def message(*parts: Part) -> Message:
    return Message(message_id="m", role=Role.ROLE_USER, parts=list(parts))


def test_a_part_without_a_media_type_has_the_one_its_content_implies():
    assert part_media_type(Part(text="hi")) == "text/plain"
    assert part_media_type(Part(data=struct_pb2.Value(number_value=1))) == "application/json"
    assert part_media_type(Part(raw=b"x")) == "application/octet-stream"
    assert part_media_type(Part(raw=b"x", media_type="Image/PNG; q=1")) == "image/png"


def test_wildcards_in_the_input_modes():
    assert accepts(("image/*",), "image/png") and accepts(("*/*",), "application/x-anything")
    assert not accepts(TEXT_ONLY, "text/html") and not accepts((), "text/plain")


@pytest.mark.parametrize(
    "parts, error",
    [
        ((Part(data=struct_pb2.Value(number_value=1)),), ContentTypeNotSupportedError),
        ((Part(raw=b"tck", media_type="application/x-unsupported-tck-type"),), ContentTypeNotSupportedError),
        (
            (Part(raw=b"a file of text", media_type="text/plain"),),
            ContentTypeNotSupportedError,
        ),  # no text part
        ((Part(text="  "),), InvalidParamsError),
        ((), InvalidParamsError),
    ],
)
def test_a_skill_refuses_what_it_cannot_read(parts, error):
    with pytest.raises(error):
        check_parts(message(*parts), TEXT_ONLY)


def test_an_agent_that_needs_no_text_takes_any_listed_type():
    check_parts(
        message(Part(data=struct_pb2.Value(number_value=1))), ("text/plain", "application/json"), False
    )
    check_parts(message(Part(text="hi"), Part(raw=b"x", media_type="text/plain")), TEXT_ONLY)
