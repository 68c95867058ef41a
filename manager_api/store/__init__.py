"""The desired state in etcd: typed reads and writes of models, deployments, applications and instances.

The only package of manager_api that talks to etcd. Key layout lives in ``protos.topology.keys.Keys``; values are
the records of ``protos.topology``. Each module does one thing:

- ``topology_store``: ``TopologyStore``, every read, write and watch of the records (and how writes race);
- ``records``: a record as stored (``Stored``: with its revision), its encoding (``encoded_record``, at most
  ``MAX_RECORD_BYTES``) and the errors of encoding and decoding one (``RecordTooLarge``, ``CorruptRecord``);
- ``errors``: the other errors a write or a watch raises (``ConflictError``, ``RevisionMismatch``,
  ``VersionNotRegistered``, ``HistoryCompacted``);
- ``changes``: the stream of changes under the prefix (``Change``, ``WatchedChanges``) that ``TopologyStore.changes``
  hands out, and ``check_history``, which refuses a start etcd has compacted away;
- ``etcd_ops``: the operations a transaction is made of, and reading one's answer.

Nothing is re-exported here: import from the module that defines what you need.
"""
