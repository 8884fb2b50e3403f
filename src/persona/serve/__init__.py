"""``persona serve``: an OpenAI-compatible server that steers per request and monitors persona projections per reply.

Modules, in the order a request meets them: ``app`` (routes, key, errors, SSE) -> ``schema`` (request
shapes) -> ``service`` (validation against the model and traits, ``traits``) -> ``batcher`` (bounded
queue, dynamic batches) -> ``engine`` (one ``generate`` per batch: ``persona.steering.rows``,
``monitoring``, ``sampling``, ``tracker``) -> ``responses``. ``cli`` is the command, ``server`` runs uvicorn.

May import: every stage up to ``commands`` (shared flags); a peer of ``study``, which it does not import.
"""
