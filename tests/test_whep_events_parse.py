"""The WHEP extension bodies, parsed without sockets: SSE event lists and layer choices, for
today's single layer and for a simulcast stream's three encodings."""

from __future__ import annotations

import json

import pytest

from lotcast.media.whep_events import (
    ExtensionError,
    Layer,
    LayerChoice,
    format_event,
    parse_event_list,
    parse_layer_choice,
)

SINGLE = [Layer(None)]
SIMULCAST = [Layer("h", width=1280, height=720), Layer("m", width=640, height=360),
             Layer("l", temporal_layers=3, width=320, height=180)]


@pytest.mark.parametrize(("body", "expected"), [
    (b'["active"]', ["active"]),
    (b'["viewercount","reconnect","viewercount"]', ["viewercount", "reconnect"]),
    (b'["active","inactive","layers","reconnect","viewercount","scte35"]',
     ["active", "inactive", "layers", "reconnect", "viewercount", "scte35"]),
])
def test_event_lists(body: bytes, expected: list[str]) -> None:
    assert parse_event_list(body) == expected


@pytest.mark.parametrize(("body", "reason"), [
    (b"", "body is not JSON"), (b"\xff", "body is not JSON"), (b"{}", "body must be a JSON array"),
    (b"[1]", "body must be a JSON array"), (b"[]", "no event named"),
    (b'["Active"]', "unknown event 'Active'"),
])
def test_bad_event_lists(body: bytes, reason: str) -> None:
    with pytest.raises(ExtensionError) as err:
        parse_event_list(body)
    assert err.value.status == 400
    assert err.value.reason.startswith(reason)


@pytest.mark.parametrize(("layers", "body", "choice"), [
    (SINGLE, {}, LayerChoice()),
    (SINGLE, {"encodingId": None}, LayerChoice()),
    (SINGLE, {"spatialLayerId": 0, "temporalLayerId": 0}, LayerChoice(None, 0, 0)),
    (SIMULCAST, {"encodingId": "m"}, LayerChoice("m")),
    (SIMULCAST, {"encodingId": "l", "temporalLayerId": 2, "maxTemporalLayerId": 2},
     LayerChoice("l", None, 2, None, 2)),
    (SIMULCAST, {}, LayerChoice()),
])
def test_layer_choices(layers: list[Layer], body: dict[str, object], choice: LayerChoice) -> None:
    assert parse_layer_choice(json.dumps(body).encode(), layers) == choice


@pytest.mark.parametrize(("layers", "body", "reason"), [
    (SINGLE, {"encodingId": "h"}, "unknown encodingId 'h'; this stream's encodings: none"),
    (SIMULCAST, {"encodingId": "x"}, "unknown encodingId 'x'; this stream's encodings: 'h', 'm', 'l'"),
    (SIMULCAST, {"spatialLayerId": 0}, "encodingId is required"),
    (SIMULCAST, {"encodingId": "h", "temporalLayerId": 1}, "temporalLayerId 1 is out of range"),
    ([], {"encodingId": "h"}, "this stream has no video layers"),
    (SINGLE, {"maxSpatialLayerId": 1.5}, "maxSpatialLayerId must be a non-negative integer"),
    (SINGLE, {"rid": "h"}, "unknown field 'rid'"),
    (SINGLE, {"mediaId": 1}, "mediaId must be a string"),
])
def test_bad_layer_choices(layers: list[Layer], body: dict[str, object], reason: str) -> None:
    with pytest.raises(ExtensionError) as err:
        parse_layer_choice(json.dumps(body).encode(), layers)
    assert err.value.status == 400
    assert err.value.reason.startswith(reason), err.value.reason


def test_layers_and_events_on_the_wire() -> None:
    assert Layer(None).to_json() == {"spatialLayerId": 0, "temporalLayerId": 0}
    assert Layer("h", width=1280, height=720, bitrate=2_500_000).to_json() == {
        "encodingId": "h", "spatialLayerId": 0, "temporalLayerId": 0, "width": 1280,
        "height": 720, "bitrate": 2_500_000}
    assert format_event("viewercount", {"viewercount": 3}) == \
        b'event: viewercount\ndata: {"viewercount":3}\n\n'
