"""Websocket messages of several frames: how they are built and read back."""

from __future__ import annotations

import msgpack
import orjson
import pytest

from kbus.errors import CodecError
from kbus.remote.wire import (
    BATCH_FRAMES,
    COALESCE_BYTES,
    batch_frames,
    check_frame,
    decode_frames,
    encode_frame,
)


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_small_frames_share_a_message_in_order_and_a_lone_frame_stays_a_map(fmt: str) -> None:
    frames = [{"t": "req", "id": i, "msg": {"x": i}} for i in range(5)]
    encoded = [encode_frame(f, fmt) for f in frames]  # type: ignore[arg-type]
    (message,) = batch_frames(encoded, fmt)  # type: ignore[arg-type]
    assert [check_frame(f, fmt) for f in decode_frames(message, fmt)] == frames  # type: ignore[arg-type]
    (alone,) = batch_frames(encoded[:1], fmt)  # type: ignore[arg-type]
    assert alone == encoded[0]
    assert decode_frames(alone, fmt) == frames[:1]  # type: ignore[arg-type]
    assert batch_frames([], fmt) == []  # type: ignore[arg-type]


def test_large_frames_go_alone_and_batches_are_bounded() -> None:
    small = encode_frame({"t": "ack", "n": 1}, "msgpack")
    big = encode_frame({"t": "put", "name": "b", "offset": 0, "data": bytes(COALESCE_BYTES)}, "msgpack")
    messages = batch_frames([small, small, big, small], "msgpack")
    assert len(messages) == 3 and messages[1] == big and messages[2] == small
    assert len(msgpack.unpackb(messages[0])) == 2
    many = batch_frames([small] * (2 * BATCH_FRAMES + 1), "msgpack")
    assert [len(decode_frames(m, "msgpack")) for m in many] == [BATCH_FRAMES, BATCH_FRAMES, 1]
    assert all(len(m) <= COALESCE_BYTES for m in many)


def test_a_message_that_is_neither_a_frame_nor_an_array_is_refused_and_bad_elements_alone() -> None:
    with pytest.raises(CodecError, match="array of frames"):
        decode_frames(msgpack.packb(3), "msgpack")
    with pytest.raises(CodecError, match="array of frames"):
        decode_frames(orjson.dumps("x").decode(), "json")
    items = decode_frames(orjson.dumps([{"t": "ack", "n": 1}, 7]).decode(), "json")
    assert check_frame(items[0], "json") == {"t": "ack", "n": 1}
    with pytest.raises(CodecError, match="must be a map"):
        check_frame(items[1], "json")
    with pytest.raises(CodecError) as info:
        check_frame({"t": "put", "data": "not base64!"}, "json")
    assert info.value.path == "data"
