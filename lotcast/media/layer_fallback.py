"""Viewers of a simulcast layer the publisher stopped sending move to the best layer below it
that still flows, and back when it returns.

A publisher may stop sending a layer at any time: Chromium pauses its upper layers when its
bandwidth estimate or its CPU cannot carry them, and a host page can turn one off
(`RTCRtpSender.setParameters`, `active: false`). Without this, that layer's viewers, pinned or
automatic, would freeze on it: the automatic choice reacts to loss and delay on the viewer's
path, and a layer that sends nothing shows neither. So one timer per stream with layers (not per
viewer) looks at each layer's last packet every CHECK_S: the viewers of a layer silent for
SILENT_S move (at a key frame, as any switch) to the highest lower layer that flows, and go back
to the layer they left once it flows again, if they are still where they were moved. A viewer
that moved on in between (the automatic choice, a new pin) is left where it is. A relay's pulls
(and a viewer that turned the automatic choice off, ``?auto=0``) carry their layer as it is
(``ForwardSink.fixed_layer``): a child relay falls back for its own viewers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lotcast.media.forwarder import ForwardSink, TrackForwarder

logger = logging.getLogger(__name__)

CHECK_S = 0.25
# Chromium's layers can run at a few frames a second under CPU pressure, and its top layer comes
# and goes while its bandwidth estimate ramps up: two seconds without a packet is a layer that
# stopped, not a slow or hesitating one (each move costs a key frame of the target layer).
SILENT_S = 2.0


def flowing(forwarder: TrackForwarder, now: float) -> bool:
    """Whether ``forwarder``'s source sent a packet within SILENT_S."""
    return now - forwarder.last_packet_time <= SILENT_S


class LayerFallback:
    """Moves one stream's viewers off silent layers and back (``check`` every CHECK_S)."""

    def __init__(self, layers: Callable[[], dict[str, TrackForwarder]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._layers = layers  # rid -> forwarder, top first
        self._clock = clock
        # sink -> (the layer it was moved off, the layer it was moved to)
        self._moved: dict[ForwardSink, tuple[TrackForwarder, TrackForwarder]] = {}
        self.fallbacks = 0
        self.returns = 0

    def check(self) -> None:
        layers = list(self._layers().values())
        if len(layers) < 2:
            self._moved.clear()
            return
        now = self._clock()
        live = [flowing(f, now) for f in layers]
        self._return(layers, live)
        for index, forwarder in enumerate(layers):
            if live[index]:
                continue
            target = next((layers[j] for j in range(index + 1, len(layers)) if live[j]), None)
            if target is None:  # nothing below flows either: the stream itself stalls
                continue
            for sink in forwarder.sinks():
                if sink.closed or sink.fixed_layer or any(f.switching(sink) for f in layers):
                    continue
                logger.info("layer %d silent %.1f s: a viewer moves to layer %d", index,
                            now - forwarder.last_packet_time, layers.index(target))
                target.switch_in(sink, forwarder)
                if sink in self._moved:  # moved twice: it goes back to where it first was
                    self._moved[sink] = (self._moved[sink][0], target)
                else:
                    self._moved[sink] = (forwarder, target)
                self.fallbacks += 1

    def _return(self, layers: list[TrackForwarder], live: list[bool]) -> None:
        for sink, (left, moved_to) in list(self._moved.items()):
            if sink.closed or left not in layers or moved_to not in layers:
                del self._moved[sink]
                continue
            if not live[layers.index(left)]:
                continue
            del self._moved[sink]
            if sink in left.sinks():  # the move had not happened yet: call it off
                left.switch_in(sink, left)
            elif sink in moved_to.sinks() and not any(f.switching(sink) for f in layers):
                logger.info("layer %d flows again: a viewer moves back from layer %d",
                            layers.index(left), layers.index(moved_to))
                left.switch_in(sink, moved_to)
                self.returns += 1

    def counters(self) -> dict[str, int]:
        return {"layer_fallbacks": self.fallbacks, "layer_fallback_returns": self.returns}
