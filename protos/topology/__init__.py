"""The desired-state schema stored in etcd, shared by manager_api (writer) and xds_control (reader).

Every value is JSON with a ``schema_version`` so that etcdctl users can read it and future versions can
migrate it. Keys live under a configurable prefix (default ``/hydro/``):

- ``models/{model}/{version}``          ModelVersion   (immutable once written)
- ``deployments/{model}/{version}``     Deployment
- ``applications/{app}``                Application
- ``instances/{model}/{version}/{id}``  Instance       (leased; written only once the instance is ready)
- ``proxies/{node_id}``                 ProxyStatus    (leased; written by xds_control)
- ``nodes/{name}``                      Node           (leased; written by the deployer running on that node)
- ``replicas/{model}/{version}/{id}``   ReplicaStatus  (leased with its node; every replica, whatever its state)
- ``pipelines/{app}/{id}``              PipelineInstance (leased; a ready pipeline runtime of a multi-stage app)
- ``pipeline-replicas/{app}/{id}``      PipelineReplicaStatus (leased with its node; every pipeline replica)

One module per kind of record, plus what they share:

- ``keys``: ``Keys``, the only place that knows the key layout above, and ``DEFAULT_PREFIX``;
- ``names``: what a model, application or node name may be (it becomes a key segment);
- ``records``: ``Record``, the base of every value (``schema_version``), timestamps and the trace context field;
- ``models``: ``ModelVersion`` and its parts (``Signature``, ``TensorSpec``, ``Datatype``, ``Artifact``);
- ``policies``: the traffic policies of a deployment (timeout, retries, circuit breaker, outlier detection,
  health checks, rate limit, request size, batching);
- ``deployments``: ``Deployment``;
- ``applications``: ``Application`` and its stages, variants and shadows;
- ``instances``: the ready endpoints, ``Instance`` and ``PipelineInstance``;
- ``replicas``: every replica's status, ``ReplicaStatus`` and ``PipelineReplicaStatus``;
- ``proxies``: ``ProxyStatus``; ``nodes``: ``Node``.

Nothing is re-exported here: import from the module that defines what you need.
"""
