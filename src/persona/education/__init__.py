"""The ASAP-SAS study: how persona steering changes students' answers (A) and graders' scores (B).

data.py            sets.json + train.tsv, checked (errors name the file, line, column, value)
prompts.py         the student's and the grader's prompts
grading.py         range graders (0-2 / 0-3) on persona.judges: local (steerable) and API
trait_vectors.py   a persona vector per trait, by route: given, pairs, generated, instruction_pairs
study.py           experiments A and B
metrics.py         QWK (sklearn), bias, MAE, agreement, effects with bootstrap CIs
results.py         a finished run read back (settings, answers, grades)
report.py          report.md + PNG/CSV of a run
report_text.py     the text of report.md, section by section
compare.py         several runs (models) side by side, coefficients raw and relative
cli.py             `persona education`

May import: every stage below, ``study`` included (its phase records); nothing imports education but the CLI.
"""
