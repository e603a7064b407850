"""deploy/kubernetes as `kubectl apply -k` would send it: rendered (its kustomization
uses only resources, one ConfigMap generator and image names, which `render` does as
kustomize does), every document valid against the Kubernetes schemas of the k3s
releases we name (kubernetes-validate, strict: an unknown field fails), the pieces
pointing at each other, and each container's command one its service accepts."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any, Dict, Iterator, List

import kubernetes_validate
import pytest
import yaml

from coordinator.cli import parse_args as coordinator_args
from coordinator.cli import settings_from
from coordinator.discovery import parse_target
from evaluator.cli import parse_args as evaluator_args
from worker.cli import parse_args as worker_args

FOLDER = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The oldest k3s release still maintained when this was written, and the newest schemas.
VERSIONS = ["1.30", kubernetes_validate.latest_version()]
KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images"}
CLUSTER_SCOPED = {"Namespace", "RuntimeClass"}
# Applied by hand, only where k3s has not made it (README "Fleet on Kubernetes").
APART = ["runtimeclass-nvidia.yaml"]

Doc = Dict[str, Any]


def render(folder: Path) -> List[Doc]:
    """The documents kustomize makes of `folder`; refuses a kustomization using more
    than this function knows, so the test never validates something else."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZE_KEYS, f"render() does not know {set(kustomization) - KUSTOMIZE_KEYS}"
    docs: List[Doc] = []
    for name in kustomization["resources"]:
        docs += [doc for doc in yaml.safe_load_all((folder / name).read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        assert generator["options"] == {"disableNameSuffixHash": True}, "a hashed name would need its references rewritten"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                     "data": {Path(f).name: (folder / f).read_text() for f in generator["files"]}})
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in kustomization.get("images", [])}
    for container in containers(docs):
        container["image"] = images.get(container["image"], container["image"])
    return docs


def containers(docs: List[Doc]) -> Iterator[Doc]:
    for doc in docs:
        if doc["kind"] in ("DaemonSet", "Deployment", "Job"):
            yield from doc["spec"]["template"]["spec"]["containers"]


def one(docs: List[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


@pytest.fixture(scope="module")
def docs() -> List[Doc]:
    return render(FOLDER)


def test_every_manifest_file_is_applied_or_named_apart() -> None:
    kustomization = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
    files = sorted(p.name for p in FOLDER.glob("*.yaml") if p.name != "kustomization.yaml")
    assert files == sorted(kustomization["resources"] + APART)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_is_valid_for_kubernetes(docs: List[Doc], version: str) -> None:
    apart = [doc for name in APART for doc in yaml.safe_load_all((FOLDER / name).read_text()) if doc]
    assert {d["kind"] for d in docs} == {"Namespace", "Service", "DaemonSet", "Deployment", "Job", "ConfigMap"}
    for doc in docs + apart:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("break_it, says", [
    (lambda d: d["spec"]["template"]["spec"].update(hostNetwork="yes"), "'yes' is not of type 'boolean'"),
    (lambda d: d["spec"]["template"]["spec"].update(nodeSelecter={"jetfed.io/worker": "true"}), "nodeSelecter"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="8777"), "8777"),
])
def test_a_broken_manifest_fails_validation(docs: List[Doc], break_it: Any, says: str) -> None:
    broken = copy.deepcopy(one(docs, "DaemonSet", "jetfed-worker"))
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError, match=says):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_headless_service_lists_the_worker_pods(docs: List[Doc]) -> None:
    service, workers = one(docs, "Service", "jetfed-workers"), one(docs, "DaemonSet", "jetfed-worker")
    pod = workers["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert workers["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["nodeSelector"] == {"jetfed.io/worker": "true"}
    port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert service["spec"]["ports"][0]["port"] == service["spec"]["ports"][0]["targetPort"] == port


def test_the_coordinators_federation_toml_names_the_services(docs: List[Doc], tmp_path: Path) -> None:
    """The ConfigMap's file is one the coordinator loads, and its addresses are the
    Services' DNS names and ports in this namespace."""
    config_map = one(docs, "ConfigMap", "jetfed-federation")
    job = one(docs, "Job", "jetfed-coordinator")
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["federation"]["configMap"]["name"] == "jetfed-federation"
    (tmp_path / "federation.toml").write_text(config_map["data"]["federation.toml"])
    settings = settings_from(coordinator_args(["--config", str(tmp_path / "federation.toml")]))
    namespace = job["metadata"]["namespace"]
    workers, evaluator = one(docs, "Service", "jetfed-workers"), one(docs, "Service", "jetfed-evaluator")
    assert settings.workers_dns is not None
    assert parse_target(settings.workers_dns) == (f"jetfed-workers.{namespace}.svc.cluster.local",
                                                  workers["spec"]["ports"][0]["port"])
    assert settings.evaluator == f"jetfed-evaluator.{namespace}.svc.cluster.local:{evaluator['spec']['ports'][0]['port']}"
    assert str(settings.out_dir).startswith(job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1]
                                            ["mountPath"])


def test_images_come_from_the_kustomization(docs: List[Doc]) -> None:
    images = {c["name"]: c["image"] for c in containers(docs)}
    assert images == {"worker": "registry.local:5000/jetfed-l4t:0.1.0-r35.2.1",
                      "evaluator": "registry.local:5000/jetfed:0.1.0", "coordinator": "registry.local:5000/jetfed:0.1.0"}


def exec_line(container: Doc, **extra: str) -> List[str]:
    """The arguments the container's script hands `jetfed` (after `exec jetfed`), its
    environment substituted as the shell would."""
    script = container["args"][0].replace("\\\n", " ")
    line = next(line.strip() for line in script.splitlines() if line.strip().startswith("exec jetfed "))
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    env.update(extra)
    words = []
    for word in shlex.split(line)[2:]:
        if word.startswith("$") and word.lstrip("$") in env:
            words += env[word.lstrip("$")].split()
        else:
            words.append(word)
    return words


def test_each_container_runs_a_command_its_service_accepts(docs: List[Doc], tmp_path: Path) -> None:
    worker = one(docs, "DaemonSet", "jetfed-worker")["spec"]["template"]["spec"]["containers"][0]
    args = worker_args(exec_line(worker, JETFED_NAME="orin-1")[1:])
    assert (args.name, args.port, args.labels, args.device, args.state_dir) == (
        "orin-1", 8777, "all", "cuda", "/var/lib/jetfed/state")
    assert next(e for e in worker["env"] if e["name"] == "JETFED_NAME")["valueFrom"] == {
        "fieldRef": {"fieldPath": "spec.nodeName"}}
    evaluator = one(docs, "Deployment", "jetfed-evaluator")["spec"]["template"]["spec"]["containers"][0]
    assert evaluator_args(exec_line(evaluator)[1:]).port == 8780
    coordinator = one(docs, "Job", "jetfed-coordinator")["spec"]["template"]["spec"]["containers"][0]
    words = exec_line(coordinator)
    assert words[:3] == ["coordinator", "--config", "/etc/jetfed/federation/federation.toml"] and "--resume" in words
    config = tmp_path / "federation.toml"
    config.write_text(one(docs, "ConfigMap", "jetfed-federation")["data"]["federation.toml"])
    assert coordinator_args(["--config", str(config), *words[3:]])["metrics_address"] == "0.0.0.0:9781"
