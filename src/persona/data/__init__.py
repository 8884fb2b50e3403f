"""Data: trait files (artifacts, pairs, TRAIT items, persona statements), chat rendering and the one chat rule,
contrastive pairs and scored CSVs as examples, token batches (length-bounded, padded) and Lightning DataModules.

May import: ``core``, ``models`` (tokenizers, context lengths), ``hooks`` (device placement of batches).
"""
