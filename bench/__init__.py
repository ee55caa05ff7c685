"""ninefs benchmarks, run by one command: ``python -m bench`` (``--quick`` for a short run).

Each workload is a module with ``NAME``, ``DESCRIPTION`` and ``run(quick: bool) -> int``,
listed in ``bench.__main__.WORKLOADS``; ``--only NAME[,NAME]`` picks some of them.
"""
