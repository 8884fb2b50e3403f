"""Analyses over vectors and models: layer separation metrics, TRAIT likelihood scores, finetuning shift,
representation shift of a fine-tuned model, data screening and the personality battery. Each writes a CSV and a PNG.

May import: everything up to ``training`` (``core``, ``models``, ``hooks``, ``data``, ``judges``, ``vectors``,
``steering``, ``generation``). Commands and studies call analyses; analyses never call commands.
"""
