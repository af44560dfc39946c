"""Data in: sensor readers and normalisation (sensors.py), chats with their items (examples.py), and the
BasicMotions tasks the demos train on (basic_motions.py, long_sequence.py)."""
