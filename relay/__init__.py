"""An edge node: pulls a stream over WHEP and forwards its RTP to many WHEP viewers."""
