"""Generating a trait's responses: the plan and its crash-safe journal (``journal``: which answers are due, how
they are keyed, seeded and stored) and the Lightning predict loop that writes them (``predict_loop``).

May import: ``core``, ``models``, ``data``, ``judges``, ``vectors``, ``steering``.
"""
