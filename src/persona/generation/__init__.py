"""Generating a trait's responses: the plan and its crash-safe journal (``journal``: which answers are due, how
they are keyed, seeded and stored), the Lightning predict loop that writes them (``predict_loop``), the
continuous-batching engine (``engine``) and how the loop runs on it, or why it keeps the static path (``on_engine``).

May import: ``core``, ``models``, ``data``, ``judges``, ``vectors``, ``steering``.
"""
