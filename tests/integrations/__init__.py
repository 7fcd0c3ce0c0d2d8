"""Acceptance tests: each public training codebase's model structure and training step, routed by treadfx
and compared with a hand-written TREAD reference on the same kept indices."""
