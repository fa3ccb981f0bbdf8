"""Side-by-side benchmarks: the same workloads on pigeon and on the messaging systems next to it.

``runner.compare`` runs the workloads (`workloads.py`) on each system adapter (`systems/`) and
returns figures with their spread, ratios against embedded pigeon and the roadmap's targets;
`report.py` turns them into JSON and a table. `pigeon bench` (without ``--url``) is the
command line on top.
"""
