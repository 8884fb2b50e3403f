"""The study: the whole method on one model, judge and hardware (`persona study -c configs/study/*.yaml`).

`persona demo` is the study with the embedded model's defaults (`configs/study/demo.yaml`).
config.py (what runs) → checks.py (every field, before any model loads) → run.py (phase order, caching, results)
→ context.py (phases bound to the model, judge and hardware) → phases.py / finetune.py / runs.py (the work)
→ records.py (each phase's cached record) → report.py (report.md, compare). ``command`` is the CLI entry.

May import: every stage up to ``commands`` (the study runs the pipeline commands); a peer of ``serve``.
"""
