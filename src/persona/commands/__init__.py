"""One module per ``persona`` pipeline command: its flags (the function signature), its checks, its outputs.

These modules import only the standard library and persona's light helpers at the top, so bad input is
answered before torch, Lightning or a model loads; the library modules that compute are imported inside
each command once its inputs have passed :mod:`persona.core.checks`.

May import: every stage below (up to ``analysis``). The applications above (``study``, ``serve``, ``education``)
compose these commands; a command never imports an application. Flags that many commands share are defined once
in :mod:`persona.commands.flags`.
"""
