"""Load and scale benchmarks, each run as a script: ``python benchmarks/NAME.py [--quick]``.

A package only so that type checkers tell benchmarks/manager_api.py from the manager_api package.
"""
