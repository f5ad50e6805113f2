"""The benchmark (`scripts/bench.py`, `make bench`): kata against runc on this machine.

- `config`: the configurations measured, derived from the installed one by drop-ins;
- `host`: commands, processes, memory, timing, the shim's spans;
- `starts`, `memory`, `metrics`, `storage`, `seccomp`, `factory`: the measurements;
- `report`: the targets, BENCHMARKS.md's generated part, the chart;
- `cli`: the command line.
"""
