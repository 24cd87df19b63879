"""The node provider of a local twin (distcl.runtime.twin): Ray's ``fake_multinode`` provider, each node with
a Ray temp directory of its own (``provider.node_temp_dir``/node_<i>). The fake provider starts every node in
the head's session directory; on one machine that makes every node's log monitor forward every worker's lines
(each progress line shown once per node), and every node's runtime-env agent unpack a job's working dir afresh
(``overwrite=True``) in the one place all nodes' workers run in (measured: a sampler actor importing torch lost
its working directory when the trainer node started). Real nodes have a disk each; so does a node of the twin.

Loaded by Ray's autoscaler as ``provider: {type: external, module: distcl.runtime.twin_provider.TwinNodeProvider,
node_temp_dir: ...}``; imports only Ray (the autoscaler's process imports it)."""

from __future__ import annotations

import functools
import os

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class TwinNodeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:  # reentrant: the fake provider takes it again; node launchers run in threads
            params = ray._private.parameter.RayParams
            # the id the fake provider gives this node next
            temp_dir = os.path.join(self.provider_config["node_temp_dir"], f"node_{self._next_node_id + 1}")
            ray._private.parameter.RayParams = functools.partial(params, temp_dir=temp_dir)
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = params
