"""What every node (broadcaster and relay) serves besides its own endpoints.

The layer between the building blocks (lotcast.media, lotcast.interactive, lotcast.ops) and the
node apps (broadcaster/, relay/): it may import all three; the apps import it; it imports
neither app (tests/test_layering.py).
"""
