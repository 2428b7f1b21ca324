"""The documentation generator: `python -m benchmarks.docs` renders every generated region of
README.md and docs/**/*.md from the results files under benchmarks/results/ and from the code
(config, CLI and HTTP references), and writes each results folder's provenance.json;
`python -m benchmarks.docs --check` renders the same in memory and exits 1 when a committed file
differs (tests/test_docs.py runs it).

A generated region is the text between two HTML comments that name a renderer and its arguments:

    <!-- generated:quality-grid llm_quality_rw -->
    ...rendered here, never edited by hand...
    <!-- /generated:quality-grid llm_quality_rw -->

A figure inside a sentence is an inline region on one line, e.g. the teacher's test NDCG@10:

    reached <!-- generated:value benchmarks/results/llm_job/report.json evaluation.metrics.teacher.ndcg@10 .4f --><!-- /generated:value benchmarks/results/llm_job/report.json evaluation.metrics.teacher.ndcg@10 .4f -->

(`value FILE DOTTED.KEY FORMAT`: a Python format spec, `.1%` for a percentage, `.2fx` for a
ratio; the figure links to FILE). Everything outside the markers is hand-written prose. Renderers live in `results.py` (results
tables; every figure links to the file it comes from), `reference.py` (config, CLI, HTTP API) and
`summary.py` (the README's summary table); `teachers.py` says which teacher each results folder
was measured on.
"""
