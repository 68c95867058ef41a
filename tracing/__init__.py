"""OpenTelemetry for every Hydro Serving process: tracing.provider (setup_tracing, active_tracer) and
tracing.settings (OTEL_* variables, collector addresses).

Nothing is re-exported here: tests/tracing/ is on the test path as a namespace portion of the same name, and a
package's ``__init__`` is then not run, so code imports the submodules.
"""
