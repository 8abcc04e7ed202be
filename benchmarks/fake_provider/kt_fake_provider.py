"""Ray's fake multi-node provider with one change, for ``benchmarks/autoscale.py``: each worker node it starts keeps
its runtime environments (the job's ``working_dir``) in a directory of its own.

The fake nodes are local processes that share the head's session directory; with Ray's default they also share
``<session>/runtime_resources``, and a node that sets up a job's ``working_dir`` unpacks it again over the copy the
job's driver (on the head) runs in: the driver's working directory is deleted under it (``os.getcwd()`` raises
FileNotFoundError; Ray Tune's end-of-run ExperimentAnalysis fails on it). A real worker node has a disk of its own,
so nothing is lost by giving each fake node its own ``runtime_resources_<node>``.

Loaded by the head's autoscaler as ``provider: {type: external, module: kt_fake_provider.KtFakeMultiNodeProvider}``
with this directory on ``PYTHONPATH``.
"""
from __future__ import annotations

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class KtFakeMultiNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:
            name = f"runtime_resources_{self._next_node_id + 1:05d}"  # the id the parent gives this node
            ray_params = parameter.RayParams

            def params(*args, **kwargs):
                kwargs.setdefault("runtime_env_dir_name", name)
                return ray_params(*args, **kwargs)

            parameter.RayParams = params
            try:
                return super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                parameter.RayParams = ray_params
