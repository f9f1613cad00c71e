"""The Spark engine: checked plans compiled to PySpark DataFrame calls, run on the owner's Spark.

Modules: :mod:`.session` (the executor's one SparkSession, from the
workspace's ``[spark]`` table), :mod:`.sources` (reading a dataset: files,
directories, Delta paths, catalog tables, with the row order made stable),
:mod:`.compile` (plan -> DataFrame calls), :mod:`.engine` (:class:`SparkEngine`:
schemas, data versions, running with cancel and time limits).

Nothing in this package imports PySpark at import time: an executor without
the ``spark`` extra runs as long as no dataset names the Spark engine.
"""
