"""The study: the whole method on one model, judge and hardware (`persona study -c configs/study/*.yaml`).

`persona demo` is the study with the embedded model's defaults (`configs/study/demo.yaml`).
config.py (what runs) → run.py (phase order, caching, results) → context.py (phases bound to the
model, judge and hardware) → phases.py / finetune.py (the work) → report.py (report.md, compare).
"""
