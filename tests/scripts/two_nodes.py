"""Run by tests/test_reliability.py in a fresh process: a two-node Ray cluster on this machine
(ray.cluster_utils.Cluster); an expert worker pinned to the second node is given registry and
base paths that do not exist there, so every expert and the base reach it through the
RegistryService on the head node. Prints one JSON line of findings."""

import json
import sys

import ray
from ray.cluster_utils import Cluster

registry, base, lora, prompt, target, cache = sys.argv[1:7]

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
cluster.add_node(num_cpus=1, resources={"far": 1})
ray.init(address=cluster.address, log_to_driver=False)
try:
    from moerge.registry import Registry
    from moerge.serving.remote import start_service
    from moerge.serving.types import ServeRequest
    from moerge.serving.workers import ExpertPool, ExpertWorker, WorkerConfig

    service = start_service(registry, base)
    far = WorkerConfig("/nonexistent/registry", base="/nonexistent/base", registry_service=service, threads=1, max_resident=4)
    worker = (
        ray.remote(ExpertWorker)
        .options(resources={"far": 1}, num_cpus=0.5, runtime_env={"env_vars": {"MOERGE_CACHE": cache}})
        .remote(far, 0)
    )
    pool = ExpertPool(WorkerConfig(registry, max_resident=4), replicas=1, workers=[worker])
    pool.ready(timeout_s=180)
    first = pool.generate([ServeRequest(prompt, (("sort", 1.0),))])[0]
    Registry(registry).register(lora, "late")  # after the worker started: fetched on first use
    late = pool.generate([ServeRequest(prompt, (("late", 1.0),))])[0]
    info = ray.get(worker.info.remote())
    head = ray.get_runtime_context().get_node_id()
    print(
        json.dumps(
            {
                "text": first.text,
                "late_text": late.text,
                "late_error": late.error,
                "worker_node": info["node_id"],
                "head_node": head,
                "worker_registry": info["registry"],
                "worker_base": info["base"],
                "target": target,
            }
        )
    )
finally:
    ray.shutdown()
    cluster.shutdown()
