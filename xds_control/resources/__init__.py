"""Envoy resource builders and type URLs: plain arguments in, xds-protos messages out, nothing else.

Every module here is pure, and each builds one kind of thing:

- ``type_urls``: the type URLs ADS serves, their push order, and ``pack`` (a message in ``Any``); the only
  module of this package that the snapshot cache and the ADS servers import;
- ``core``: the pieces of Envoy's core API that the others share (ADS config source, durations, addresses,
  header options, format strings);
- ``clusters`` (CDS) and ``endpoints`` (EDS);
- ``listeners`` (LDS): HTTP listeners and their connection managers;
- ``routes`` (RDS): routes, route actions (timeouts, retries, weighted clusters) and route configurations;
- the HTTP filters a listener carries and the per-route configs that turn them on: ``request_limits`` (rate
  limit, body size), ``headerless_grpc`` (routing gRPC calls by the model their request names), and
  ``local_replies`` (Envoy's own answers as Open Inference Protocol errors).

Translation from topology to these calls lives in xds_control/translate.py; the tracing block of a connection
manager and the collector cluster in xds_control/tracing_config.py. Nothing is re-exported here: import from the
module that builds what you need.
"""
