"""The benchmarks: each module measures one thing the docs quote (memory against
Lightning's, the trainer's overhead, Llama's memory and communication, compile time, the
persistent cache, generation, LoRA, a GPU run, ...), prints a table and writes JSON with its
provenance (:mod:`jtp.bench.results`); :mod:`jtp.bench.docs` renders the pages' tables from
that JSON. They drive the library through its public modules, as a user's script would.
The program is ``jtp bench NAME`` (:mod:`jtp.cli.bench`).
"""
