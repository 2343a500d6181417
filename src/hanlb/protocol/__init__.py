"""Wire protocols: framing.py (the envelope), codec.py (typed bodies), messages.py."""
